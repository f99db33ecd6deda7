"""A ledger node: the shard owners this node has won, wired to the store and the elector.

The node also records, in the audit chain of every shard it serves, the admin actions that
never pass through a shard's journal (``model.NoteAdmin``, ``ShardOwner.note_admin``):

* each takeover: first every change of the shard's home the shard map holds and the chain
  lacks, each under its own principal and action (``MoveShard``, ``Failover``, ``Failback``,
  ``RestoreHomes`` by an operator; ``AutoFailover`` by the node that took a dead region's
  shards) with its regions and reason; then ``TakeOver`` under this node's principal (a
  move, a node start, a lease that lapsed), with its epoch and the policy and certificate it
  enforces;
* each change of what it enforces: ``PolicyReloaded`` (the policy file changed; its name and
  digest) and ``CertificateRotated`` (the node's certificate; its principal, fingerprint and
  expiry), on every shard it serves.

**Warm standbys.** A planned move (a failback, ``ledgerctl failover``) hands shards to a node
while another still serves them. The ownership adapter names them (``warm_targets``: each
reconcile, the shards this node is next in line for); the node loads and folds each one
ahead (``ledger.compaction.warm``: reads and a fold, nothing written), and the adapter lets
the old owner know it is ready, which then lets go (``shard_router.placement``). The takeover
then fences and replays only the batches appended since (``JournalStore.load_after``), onto
the warm state. Measured on a region that had just come back (its Cassandra node restarted a
minute before): a failback's takeover loaded 1,000-1,400 batches in 6.1-7.8 s while no node
served the shard (README, "Heal without stalls"). A warm state the journal no longer
continues (a fence in between read a lower head, a snapshot truncated past it) or whose
batches' rows are not all written is dropped, and the takeover loads the journal afresh.

**Failover standbys.** A crash gives no warning, so the adapter also names the shards this
node would win if their owner's node vanished (``placement.failover_successor``); the node
keeps a standby of each and *follows* it: every ``K.WARM_FOLLOW_S`` the batches appended
since (up to the rows mark) are read and folded onto it. A gain that comes while a follow
runs waits for it, briefly, after its fence (``compaction.standby_of``). So a takeover
after a crash, a lost lease or a paused owner replays seconds of journal, not everything
since the last snapshot. The price: a second copy of those shards' states, a second fold
of their batches, a read per standby every 2 s (``ledgerd node --no-failover-standbys``
turns it off).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from typing import AbstractSet as Set, Callable

from ledger import constants as K
from ledger import metrics
from ledger.compaction import WarmShard, warm
from ledger.core.model import NoteAdmin
from ledger.core.shard import ShardState
from ledger.owner import AdminNote, ShardOwner
from ledger.runtime.tasks import spawn
from ledger.store.port import JournalStore, StoreUnavailable
from shard_router.ownership import Ownership
from shard_router.router import RemoteTransport, Router

log = logging.getLogger("ledger.node")


class Node:
    """Starts an owner for every shard the elector gives this node, stops it on loss."""

    def __init__(self, store: JournalStore, ownership: Ownership,
                 transport: RemoteTransport | None = None, principal: str | None = None,
                 log_transitions: bool = True, **owner_options) -> None:
        self.store = store
        self.ownership = ownership
        # Who this node is in the audit trail: its certificate's identity, or node:<id>.
        self.principal = principal or f"node:{ownership.node_id}"
        # What it enforces, as its takeover records say (``ledger.server`` sets it).
        self.security_facts: Callable[[], str] = lambda: "plaintext (no TLS, no policy)"
        self.owners: dict[int, ShardOwner] = {}
        self.router = Router(ownership.node_id, self.owners, ownership, transport,
                             await_takeover=self.serving_owner)
        self._owner_options = owner_options
        # The line per shard taken over or given up: INFO, or DEBUG (``ledger.server.start``).
        self._log_transition = log.info if log_transitions else log.debug
        self._locks: dict[int, asyncio.Lock] = {}
        self._changed = asyncio.Condition()
        self._transitions = 0  # shard gains or losses in progress
        # Takeovers at once (a loss never waits for it: it only stops an owner), and of
        # them, replays folding at once (the CPU-bound part).
        self._takeover_slots = asyncio.Semaphore(K.TAKEOVERS_CONCURRENT_MAX)
        self._replay_slots = asyncio.Semaphore(K.REPLAYS_CONCURRENT_MAX)
        # The latest epoch reported per shard (0: lost). A gain that waited for a takeover slot
        # while a later report came in is void: the later one decides.
        self._latest: dict[int, int] = {}
        # When each gain (shard, epoch) was reported, until its takeover ran (takeover time,
        # /metrics: a wait for a takeover slot counts too).
        self._gain_reported_at: dict[tuple[int, int], float] = {}
        # Per shard being taken over: set once that takeover ended (serving, or failed).
        # Calls for the shard wait on it (``serving_owner``) instead of being sent back.
        self._taking_over: dict[int, asyncio.Event] = {}
        # Warm standbys: states folded ahead (ready), warm-ups running, and when a warm-up of
        # a shard last failed (it is not tried again for K.WARM_RETRY_S).
        self._warm: dict[int, WarmShard] = {}
        self._warming: dict[int, asyncio.Task] = {}
        self._warm_failed_at: dict[int, float] = {}
        # Shards whose ready standby is being brought up to date (``warm_targets``).
        self._following: set[int] = set()
        # A gain's standby, from its report until its takeover runs.
        self._standby_for: dict[tuple[int, int], WarmShard | asyncio.Task] = {}
        self._warm_slots = asyncio.Semaphore(K.WARMS_CONCURRENT_MAX)
        # Why this node's store is catching up with the other regions, as last checked
        # (None: caught up). Warm-ups wait while it is (``_store_caught_up``).
        self._catching_up: str | None = None
        self._catching_up_said_at = -math.inf  # when it was last logged

    async def start(self) -> None:
        set_warmer = getattr(self.ownership, "set_warmer", None)
        if set_warmer is not None:  # etcd: planned moves wait for this node's warm standbys
            set_warmer(self.warm_targets)
        await self.ownership.start(self._on_ownership)

    def warm_targets(self, shards: Set[int], keep: Set[int] = frozenset()) -> set[int]:
        """Keep a warm standby of each of ``shards``; return those ready.

        Called by the ownership adapter at every reconcile with the shards this node is next
        in line for (a planned move's, and those it would take over if their owner failed),
        and ``keep``: those it is campaigning for (released: their standbys are kept, not
        started). Any other standby is dropped (a running warm-up cancelled). A standby of
        ``shards`` follows the journal: once its last read is ``K.WARM_FOLLOW_S`` old, what
        was appended since is read and folded onto it (it counts as ready meanwhile; a
        takeover that comes then continues from what the follow brings). One only kept is dropped once older than
        ``K.WARM_KEEP_S``. A shard this node serves or is taking over is not warmed; a gain
        takes its standby at once (``_on_ownership``).
        """
        now = time.monotonic()
        for shard in [s for s, w in self._warm.items() if s not in shards
                      and (s not in keep or now - w.loaded_at > K.WARM_KEEP_S)]:
            del self._warm[shard]
        for shard in [s for s in self._warming if s not in shards and s not in keep]:
            self._warming.pop(shard).cancel()
        for shard in sorted(shards):
            if (shard in self._warming or shard in self.owners
                    or self._latest.get(shard, 0)
                    or now - self._warm_failed_at.get(shard, -math.inf) < K.WARM_RETRY_S):
                continue
            previous = self._warm.get(shard)
            if previous is not None:
                if now - previous.loaded_at < K.WARM_FOLLOW_S:
                    continue
                del self._warm[shard]  # folded further by the follow, held by nobody else
            task = self._warming[shard] = spawn(self._warm_one(shard, previous),
                                                f"warm-{shard}")
            if previous is not None:
                # Counted ready until the follow ends, however it ends (even cancelled
                # before it ran).
                self._following.add(shard)
                task.add_done_callback(functools.partial(_unfollow, self._following, shard))
        return set(self._warm) | self._following

    async def _store_caught_up(self) -> bool:
        """Whether this node's store has caught up with the other regions (a store without
        ``catching_up``: always). The ownership is told either way (``set_catching_up``): an
        owner handing a shard to this node waits longer for a store that is catching up
        than for a warm-up that is merely slow."""
        check = getattr(self.store, "catching_up", None)
        reason = await check() if check is not None else None
        now = time.monotonic()
        flipped = (reason is None) != (self._catching_up is None)
        self._catching_up = reason  # before the await: concurrent warm-ups see it
        if flipped or (reason is not None
                       and now - self._catching_up_said_at >= K.CATCH_UP_LOG_S):
            if reason:
                log.warning("warm standbys wait: this region's store is catching up (%s)",
                            reason)
            else:
                log.info("warm standbys: this region's store has caught up")
            self._catching_up_said_at = now
            tell = getattr(self.ownership, "set_catching_up", None)
            if tell is not None:
                await tell(reason is not None)
        return reason is None

    async def _warm_one(self, shard: int,
                        previous: WarmShard | None = None) -> WarmShard | None:
        """Warm (or, from ``previous``, follow) a standby of ``shard``: kept in ``_warm``,
        and returned (to a takeover that waits for a follow, ``compaction.standby_of``);
        None if it failed or must wait."""
        task = asyncio.current_task()
        try:
            async with self._warm_slots:
                if not await self._store_caught_up():
                    # Not a failure of the warm-up: tried again after K.WARM_RETRY_S.
                    self._warm_failed_at[shard] = time.monotonic()
                    metrics.WARM_STANDBYS.labels("waiting").inc()
                    return None
                ready = await warm(self.store, shard, self._replay_slots, previous)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store unreachable (or a bug): the takeover loads afresh
            metrics.WARM_STANDBYS.labels("failed").inc()
            self._warm_failed_at[shard] = time.monotonic()
            log.warning("shard %d: warm standby not ready: %r", shard, exc)
            return None
        else:
            if self._warming.get(shard) is task and not self._latest.get(shard, 0):
                self._warm[shard] = ready
                if previous is None:
                    metrics.WARM_STANDBYS.labels("ready").inc()
                    self._log_transition("shard %d warm standby at batch %d after %.0f ms",
                                         shard, ready.state.seq, ready.took_s * 1000)
                else:
                    metrics.WARM_STANDBYS.labels("followed").inc()
            return ready
        finally:
            if self._warming.get(shard) is task:
                del self._warming[shard]

    def _take_warm(self, shard: int) -> WarmShard | asyncio.Task | None:
        """The shard's warm state for its takeover, if fresh; a running warm-up stops,
        except the follow of a ready standby: that task is returned, and its result (the
        standby brought up to date) is what the takeover waits for, briefly, once it
        has fenced (``compaction.standby_of``)."""
        running = self._warming.pop(shard, None)
        if running is not None:
            if shard in self._following:
                return running
            running.cancel()
        ready = self._warm.pop(shard, None)
        if ready is not None and time.monotonic() - ready.loaded_at > K.WARM_KEEP_S:
            return None
        return ready

    async def close(self) -> None:
        metrics.forget_node(self)
        await self.ownership.close()
        for task in self._warming.values():
            task.cancel()
        self._warming.clear()
        self._warm.clear()
        for standby in self._standby_for.values():
            if isinstance(standby, asyncio.Task):
                standby.cancel()
        self._standby_for.clear()
        for shard in list(self.owners):
            self._transitions += 1
            await self._transition(shard, 0)

    async def _on_ownership(self, shard: int, epoch: int) -> None:
        # Owners start concurrently, up to K.TAKEOVERS_CONCURRENT_MAX replaying at once;
        # transitions of one shard stay in order behind its lock.
        self._transitions += 1
        self._latest[shard] = epoch
        if epoch:
            self._gain_reported_at[(shard, epoch)] = time.monotonic()
            # Its warm standby, if any, goes with this gain (a reconcile meanwhile, which no
            # longer lists the shard, must not drop it).
            standby = self._take_warm(shard)
            if standby is not None:
                self._standby_for[(shard, epoch)] = standby
        if epoch == 0:
            await self._transition(shard, 0)  # a loss must be complete before we return
        else:
            ended = self._taking_over.get(shard)
            if ended is None or ended.is_set():
                ended = self._taking_over[shard] = asyncio.Event()
            spawn(self._transition(shard, epoch, ended), f"takeover-{shard}")

    async def _transition(self, shard: int, epoch: int,
                          ended: asyncio.Event | None = None) -> None:
        lock = self._locks.setdefault(shard, asyncio.Lock())
        try:
            if epoch:
                async with self._takeover_slots:
                    await self._transition_locked(lock, shard, epoch)
            else:
                await self._transition_locked(lock, shard, epoch)
        finally:
            self._transitions -= 1
            if ended is not None and self._taking_over.get(shard) is ended:
                ended.set()  # the takeover is over: served, failed, or superseded
            if epoch and shard in self.owners:
                self.router.route_changed()
            async with self._changed:
                self._changed.notify_all()

    async def serving_owner(self, shard: int, wait_s: float) -> ShardOwner | None:
        """This node's owner of ``shard`` if it serves it; if the node is taking the shard
        over, that owner once it serves, waiting up to ``wait_s``; else None."""
        owner = self.owners.get(shard)
        if owner is not None and owner.serving:
            return owner
        ended = self._taking_over.get(shard)
        if ended is None or ended.is_set() or wait_s <= 0:
            return None
        try:
            await asyncio.wait_for(ended.wait(), wait_s)
        except asyncio.TimeoutError:
            return None
        owner = self.owners.get(shard)
        return owner if owner is not None and owner.serving else None

    async def _transition_locked(self, lock: asyncio.Lock, shard: int, epoch: int) -> None:
        # When this gain was reported (a later report of the shard, a loss or another gain,
        # has its own entry: taking the shard's latest one made a takeover's wait negative).
        reported_at = self._gain_reported_at.pop((shard, epoch), None) if epoch else None
        standby = self._standby_for.pop((shard, epoch), None) if epoch else None
        async with lock:
            if epoch and self._latest.get(shard, epoch) != epoch:
                return  # superseded while it waited: a later loss or gain of the shard decides
            current = self.owners.pop(shard, None)
            if current is not None:
                stopping = time.monotonic()
                await current.stop("ownership lost" if epoch == 0 else "stopped")
                metrics.SHARD_LOSSES.inc()
                if epoch == 0:
                    flushing = time.monotonic()
                    await self._flush_rows(shard, current.state.seq)
                    self._log_transition(
                        "shard %d epoch %d given up at batch %d: stopped in %.0f ms, rows "
                        "flushed in %.0f ms", shard, current.epoch, current.state.seq,
                        (flushing - stopping) * 1000, (time.monotonic() - flushing) * 1000)
            if epoch:
                owner = ShardOwner(shard, epoch, self.store, self.router,
                                   on_stopped=self._owner_stopped,
                                   lease_valid=self.ownership.lease_valid,
                                   replay_slots=self._replay_slots,
                                   lease_valid_for=getattr(self.ownership, "lease_valid_for",
                                                           None),
                                   wait_lease=getattr(self.ownership, "wait_lease_valid",
                                                      None),
                                   confirm_held=getattr(self.ownership, "confirm_held", None),
                                   **self._owner_options)
                started = time.monotonic()
                try:
                    await owner.start(standby)
                except Exception:
                    metrics.TAKEOVER_FAILURES.inc()
                    log.exception("shard %d epoch %d failed to start", shard, epoch)
                    spawn(self.ownership.release(shard), f"release-{shard}")
                else:
                    self.owners[shard] = owner
                    owner.note_admin(self._takeover_note(shard, epoch))
                    took_s = time.monotonic() - started
                    metrics.TAKEOVERS.inc()
                    # From the report of the gain: a wait for a takeover slot counts too.
                    reported = started if reported_at is None else reported_at
                    metrics.TAKEOVER_SECONDS.observe(time.monotonic() - reported)
                    t = owner.takeover_timings
                    warm_seq = t.get("warm_seq")
                    if warm_seq is not None:
                        metrics.WARM_STANDBYS.labels("used" if warm_seq >= 0
                                                     else "discarded").inc()
                    # A takeover is rare and is what a failover or a drain costs: one line
                    # each, with where the time went.
                    (log.warning if took_s > K.SLOW_TAKEOVER_S else self._log_transition)(
                        "shard %d epoch %d serving after %.0f ms (waited %.0f ms for a slot; "
                        "fence %.0f, load %.0f, replay %.0f ms: %d batches%s, to batch %d, "
                        "rows of %d written again: %d rows in %.0f ms)",
                        shard, epoch, took_s * 1000, (started - reported) * 1000,
                        t.get("fence_s", 0) * 1000, t.get("load_s", 0) * 1000,
                        t.get("replay_s", 0) * 1000, t.get("batches", 0),
                        "" if warm_seq is None else
                        f" after a warm standby at batch {warm_seq}" if warm_seq >= 0 else
                        " (warm standby discarded)",
                        owner.state.seq, t.get("rows_batches", 0), t.get("rows", 0),
                        t.get("rows_s", 0) * 1000)

    async def _flush_rows(self, shard: int, seq: int) -> None:
        """Before a shard is handed on (a release waits for this): its rows written and
        marked, so the next owner's replay writes none again. Bounded by
        ``K.RELEASE_ROWS_FLUSH_S``; a failure only costs the next owner that rewrite."""
        try:
            await asyncio.wait_for(self.store.flush_rows(shard, seq), K.RELEASE_ROWS_FLUSH_S)
        except (asyncio.TimeoutError, StoreUnavailable) as exc:
            metrics.STORE_ERRORS.labels("flush_rows", type(exc).__name__).inc()
            log.info("shard %d: rows up to batch %d not flushed before the hand-over (%s); "
                     "the next owner writes them", shard, seq, type(exc).__name__)

    def _takeover_note(self, shard: int, epoch: int) -> AdminNote:
        """How this node came to serve ``shard`` (built when the owner's batch is formed)."""
        ownership = self.ownership

        def build(state: ShardState, now_ms: int) -> list[NoteAdmin]:
            changes = ownership.home_changes(shard)
            ids = [c.change_id for c in changes]
            # Changes up to the last one recorded are in the chain already (the map keeps
            # them in order); all of them if that one is no longer kept.
            start = ids.index(state.admin_change) + 1 if state.admin_change in ids else 0
            notes = [NoteAdmin(c.action, c.principal, f"shard {shard}",
                               f"home {c.from_region or '?'} -> {c.to_region} at {c.at_ms}"
                               + (f"; reason: {c.reason}" if c.reason else ""),
                               c.change_id, now_ms) for c in changes[start:]]
            notes.append(NoteAdmin(
                "TakeOver", self.principal, ownership.node_id,
                f"node {ownership.node_id} ({ownership.region}) epoch {epoch}; "
                f"{self.security_facts()}", "", now_ms))
            return notes

        return build

    def note_admin(self, action: str, subject: str, detail: str) -> None:
        """Record an admin action of this node (a policy or certificate change) in the audit
        chain of every shard it serves. Call on the event loop."""
        for owner in list(self.owners.values()):
            owner.note_admin(lambda _state, now_ms: [NoteAdmin(
                action, self.principal, subject, detail, "", now_ms)])

    async def _owner_stopped(self, shard: int, epoch: int, reason: str) -> None:
        owner = self.owners.get(shard)
        if owner is not None and owner.epoch == epoch:
            del self.owners[shard]
            metrics.SHARD_LOSSES.inc()
        # Give the shard up so that it is elected again with a new epoch (here or elsewhere)
        # and the new owner replays what the journal really holds.
        spawn(self.ownership.release(shard), f"release-{shard}")

    async def wait_serving(self, shards_min: int, timeout_s: float) -> bool:
        """Wait until no shard is being taken over and at least ``shards_min`` are served."""
        def ready() -> bool:
            serving = sum(1 for o in self.owners.values() if o.serving)
            return self._transitions == 0 and serving >= shards_min
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                return False
        return True


def _unfollow(following: set[int], shard: int, _task: asyncio.Task) -> None:
    following.discard(shard)
