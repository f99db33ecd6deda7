"""Shard map and shard owners kept in etcd: the ``Ownership`` adapter for real clusters.

Key layout (all under ``prefix``, default ``/redledger``)::

    {prefix}/map/{shard:05d}    {"home_region": "r1", "origin": .., "change": ..}  no lease
    {prefix}/owner/{shard:05d}  {"node_id": .., "region": .., "address": ..}  owner's lease
    {prefix}/nodes/{node_id}    {"region": .., "address": .., "warms": .., "catching_up": ..}
                                                                  node's lease
    {prefix}/warm/{shard:05d}   {"node_id": ..}                              that node's lease

A warm key says that its node, next in line for a shard a planned move hands to its region,
holds a warm standby of it (``ledger.node``, "warm standbys"); the owner hands the shard over
once it appears, or after ``warm_wait_s`` (``shard_router.placement``, "Warm successor first").

A map entry written by a move carries ``changes``, the latest ``HOME_CHANGES_KEPT`` changes of
the shard's home (``shard_router.ownership.HomeChange``: who moved it, how, why, when); the
node that next takes the shard over records those its audit chain lacks (``ledger.node``).
Two processes changing one shard's home at the same instant may drop each other's entry from
the list (the write is not compared against the entry it extends): the move stands, its
record may be missing.

Election: a node wins a shard with the transaction ``create_revision(owner key) == 0 ->
put(owner key, lease)``. The key's create revision is the shard's epoch (fencing token). etcd
revisions only grow, so a shard won again always gets a higher epoch than any before it.

Safety: an owner key lives exactly as long as its node's lease. The lease can expire at etcd no
earlier than ``TTL`` after etcd received the last successful keep-alive, which is after this
node *sent* it. So this node counts its own deadline from the moment it sends each keep-alive,
minus a safety margin for clock-rate drift and scheduling delay, and stops serving when that
deadline passes (``lease_valid()`` turns False). A node therefore stops serving before any other
node can win its shards. A node paused longer than that (GC, SIGSTOP) cannot notice in time; the
journal store stops it then: an append is acknowledged only if this lease is still valid once
the write completed, and a batch written after the next owner fenced never counts
(``coordinator/PROTOCOL.md``, "Fencing").

Suspend, not give up: at the deadline the node *suspends* its shards (their owners keep their
state and hold their commands, ``wait_lease_valid``) instead of reporting them lost, and keeps
sending keep-alives every ``SUSPENDED_RETRY_S``. etcd's answer decides:

* the lease is alive (TTL > 0): nobody can have won a shard whose owner key is on it, unless
  the key was deleted outright (a release, an operator, a stale-key cleanup). A linearizable
  read of the owner keys settles that: shards whose key still names this node with the same
  create revision (epoch) serve again at once, with the deadline of that keep-alive; any other
  is reported lost. An etcd restart (every member down, then up: etcd's new leader extends
  every lease by its TTL) or a leader election longer than the margin therefore costs the time
  etcd was away, not a takeover of every shard;
* the lease is gone (TTL 0: the node was cut off from a live etcd, or paused, for longer than
  the TTL, and others may own its shards by now): every shard is reported lost, as before.

While etcd cannot be reached at all the shards stay suspended: this node cannot tell an etcd
outage (nobody can win anything) from a partition that cuts only it off (others win its shards
after the TTL), so it serves nothing until etcd answers.

Which node campaigns for an unowned shard, and when an owner hands a shard on, is a pure,
deterministic policy in ``shard_router.placement`` (rendezvous hashing of (shard, node id)
over the live nodes of the shard's home region, with backups in the same region after
``takeover_grace_s`` and, when the home region has no live node, nodes of other regions:
failover). This module only gathers what the policy looks at from etcd and carries its
decisions out. The compare-and-swap makes any race safe; the policy only keeps races rare and
load spread.

Keep-alives from a thread of their own: the lease is renewed by a dedicated thread, not by a
task of the event loop, so a node whose loop is busy for a while (a takeover decoding a long
journal, a burst of work on a loaded machine) keeps its lease and serves on when the loop runs
again, instead of losing every shard to a false failover. It is the split Kafka's consumers made
(KIP-62: heartbeats from a background thread, a bound on the time between polls): the thread
stops renewing once the loop has not run for ``LOOP_STALL_MAX_S``, so a wedged process still
loses its shards. It extends the local deadline itself (under ``_lease_lock``, never for a
suspended or lost session) and hands every answer to the loop, which does all the rest. The
loop's own lateness is measured on the way (``loop_stalls``, ``longest_loop_stall_s``).

pyetcd is synchronous, so its calls run in a small thread pool; its watch thread hands
responses to the event loop with ``call_soon_threadsafe``. All state below is touched only on
the event loop, so it needs no locks, except a session's deadline and suspension, which the
keep-alive thread reads and extends under ``_lease_lock``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AbstractSet, Any, Callable, Iterable, Mapping, Sequence, TypeVar

import grpc
import pyetcd
from pyetcd import events as etcd_events
from pyetcd import exceptions as etcd_exceptions
from pyetcd import transactions as etcd_txn

from ledger.runtime.tasks import spawn
from shard_router.constants import CATCH_UP_WAIT_S, WARM_WAIT_S
from shard_router.endpoints import parse_endpoints
from shard_router.ownership import (HOME_CHANGES_KEPT, HomeChange, OwnerInfo,
                                    OwnershipListener, ShardPlacement)
from shard_router.placement import (Action, ShardView, default_home, is_failover,
                                    keepalive_period_s, lease_deadline, plan,
                                    preferred_node, release_hold_s)

# Callers that still import the policy from here (``preferred_node``, ``default_home``) keep
# working; new code imports ``shard_router.placement``.
__all__ = ["EtcdOwnership", "EtcdOwnershipError", "default_home", "preferred_node"]

log = logging.getLogger(__name__)

# Every unary etcd call gives up after this long; the loop that made it retries.
ETCD_RPC_TIMEOUT_S = 2.0
# With several endpoints (one etcd member per region), one whose call failed (the member is
# down, or unreachable) is passed over for this long: the calls go to the next member. With
# one endpoint there is no other to go to, and it is tried again at once (pyetcd's default,
# 300 s, would turn a short etcd restart into a five-minute outage).
ETCD_ENDPOINT_RETRY_S = 1.0
# Worker threads for blocking pyetcd calls. Keep-alives, campaigns and the watch setup may
# block at the same time; more than this queue behind each other.
ETCD_THREADS = 4
# Operations per transaction. etcd refuses transactions above --max-txn-ops (default 128).
TXN_OPS_MAX = 64
# While suspended (past the local deadline, no keep-alive answered), a keep-alive is sent
# this often: the shards serve again as soon as etcd is back and confirms the lease.
SUSPENDED_RETRY_S = 0.1
# gRPC's reconnect backoff of the etcd channels (ms). Its defaults (1 s growing to 120 s) left
# a node reconnecting seconds after a restarted etcd answered again (restart-etcd drill).
ETCD_RECONNECT_BACKOFF_MS_MIN = 100
ETCD_RECONNECT_BACKOFF_MS_MAX = 500
# The event loop notes that it runs this often (s); the keep-alive thread reads the note.
LOOP_BEAT_S = 0.1
# The keep-alive thread renews the lease only while the event loop ran within this long (s):
# long enough to ride out the stalls of a loaded machine (measured: README, "Failover at
# load"), short enough that a wedged process loses its shards within this plus the TTL.
LOOP_STALL_MAX_S = 5.0
# A beat this much later than due counts as a loop stall (``loop_stalls``, /metrics).
LOOP_STALL_REPORT_S = 0.5
# Two keep-alives further apart than this many TTLs are logged (a near miss: at one TTL the
# lease is gone).
KEEPALIVE_GAP_REPORT_TTLS = 0.5
# Grace timers are checked at least this often even when the watch reports nothing.
RECONCILE_TICK_S_MAX = 0.5
# Backoff between retries of a failed etcd step (watch setup, new lease, reconcile round).
RETRY_BACKOFF_S_MIN = 0.1
RETRY_BACKOFF_S_MAX = 2.0
# ``start()`` retries a join that failed with etcd unreachable or too slow (a member down, a
# leader election on a loaded machine: both answer UNAVAILABLE for a moment) for this long,
# moving over the endpoints, before it gives up. A refusal (permissions, bad request) is final.
JOIN_TIMEOUT_S = 15.0
# A node whose call to a shard's owner failed probes the owner's address (``report_unreachable``):
# DEAD_PROBES TCP connections, DEAD_PROBE_GAP_S apart, each refused at once (the host is up
# and nothing listens on the port: the owner's process is gone), and it revokes the owner's
# lease then instead of waiting out its TTL. Anything else (a connection made, a timeout, an
# unreachable host) proves nothing and leaves it to the lease; that address is then not
# probed again for DEAD_PROBE_QUIET_S.
DEAD_PROBES = 2
DEAD_PROBE_GAP_S = 0.1
DEAD_PROBE_CONNECT_TIMEOUT_S = 0.5
DEAD_PROBE_QUIET_S = 1.0
# ``close()`` waits at most this long for loss callbacks before revoking the lease anyway.
CLOSE_LISTENER_TIMEOUT_S = 5.0
# ``close()`` waits at most this long for its background loops to stop after cancelling them.
TASK_STOP_TIMEOUT_S = 5.0

_ETCD_ERRORS = (etcd_exceptions.Etcd3Exception, grpc.RpcError, ValueError)
# The errors of an etcd that is away for a moment rather than one that refuses.
_ETCD_TRANSIENT = (etcd_exceptions.ConnectionFailedError, etcd_exceptions.ConnectionTimeoutError)
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", ETCD_RECONNECT_BACKOFF_MS_MIN),
                    ("grpc.min_reconnect_backoff_ms", ETCD_RECONNECT_BACKOFF_MS_MIN),
                    ("grpc.max_reconnect_backoff_ms", ETCD_RECONNECT_BACKOFF_MS_MAX)]

T = TypeVar("T")


class EtcdOwnershipError(RuntimeError):
    """etcd could not be reached or refused a request while joining or moving shards."""


def etcd_client(endpoints: str | list[tuple[str, int]], timeout_s: float,
                credentials: grpc.ChannelCredentials | None = None) -> Any:
    """A pyetcd client of every endpoint (``HOST:PORT[,...]`` or parsed): it starts on one
    (pyetcd picks at random, so a region's nodes spread over the members) and moves to the
    next when a call fails with the member unreachable, passing the failed one over for
    ``ETCD_ENDPOINT_RETRY_S``. The call that failed raises; its caller retries, as with one
    endpoint."""
    pairs = parse_endpoints(endpoints) if isinstance(endpoints, str) else endpoints
    several = len(pairs) > 1
    retry_s = ETCD_ENDPOINT_RETRY_S if several else 0.0
    return pyetcd.MultiEndpointEtcd3Client(
        endpoints=[pyetcd.Endpoint(host, port, secure=credentials is not None,
                                   creds=credentials, time_retry=retry_s, opts=_CHANNEL_OPTIONS)
                   for host, port in pairs],
        timeout=timeout_s, failover=several)


@dataclass(slots=True)
class _Session:
    """One lease and the deadline until which this node may serve under it."""

    lease_id: int
    opened_at: float  # monotonic
    deadline: float   # monotonic; past it the lease may be gone at etcd
    lost: bool = False
    # Since when (monotonic) the deadline passed without an answered keep-alive: the shards
    # are held, not served, until etcd confirms the lease or says it is gone. None: not.
    suspended_at: float | None = None


@dataclass(slots=True, frozen=True)
class _OwnerRecord:
    node_id: str
    region: str
    address: str
    epoch: int  # the key's create revision
    lease: int


@dataclass(slots=True)
class _NodeRecord:
    region: str
    address: str
    first_seen: float  # monotonic, local
    warms: bool = False  # keeps warm standbys of shards moving to it (announces warm keys)
    catching_up: bool = False  # its store is catching up with the other regions


async def _refused(host: str, port: int) -> bool:
    """True if a TCP connection to ``host:port`` is refused (nothing listens there)."""
    if port <= 0:
        return False  # not an address anyone listens on: proves nothing
    try:
        async with asyncio.timeout(DEAD_PROBE_CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False  # unreachable, reset, slow: a partition or a pause looks like this
    writer.close()
    return False


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _Backoff:
    """The pause between retries of a failed etcd step: RETRY_BACKOFF_S_MIN, doubling up to
    RETRY_BACKOFF_S_MAX, back to the minimum after a success (``reset``)."""

    def __init__(self) -> None:
        self.s = RETRY_BACKOFF_S_MIN

    def reset(self) -> None:
        self.s = RETRY_BACKOFF_S_MIN

    def grow(self) -> float:
        """The pause to take now; the next one is twice as long (up to the maximum)."""
        pause, self.s = self.s, min(self.s * 2, RETRY_BACKOFF_S_MAX)
        return pause

    async def sleep(self) -> None:
        await asyncio.sleep(self.grow())


class EtcdOwnership:
    """Elects shard owners through etcd leases and keeps the shard map in etcd.

    Args:
        endpoint: etcd client address, ``host:port``.
        node_id: This node's unique id.
        region: This node's region.
        address: ``host:port`` of this node's gRPC server, published to routers.
        regions: All regions; a fresh shard map places shard ``s`` in
            ``regions[s % len(regions)]``.
        shard_count: Number of virtual shards (fixed for the life of a ledger).
        lease_ttl_s: Lease TTL. etcd rounds it up to whole seconds and to its minimum (about
            2 s with default timing); the local deadline uses the smaller of asked and granted.
        takeover_grace_s: How long an unowned shard waits for its preferred node before backups
            of the home region, and then other regions, campaign.
        prefix: Root of every key this adapter uses.
        rebalance: Hand shards to better-ranked nodes of the home region once they are stable.
        credentials: Mutual TLS to etcd with these channel credentials (the caller's
            certificate: ``ledger.security.etcd_auth``, etcd then lets only node and operator
            certificates use the map); None: plaintext.
        principal: Who this process is, as recorded with the shard map changes it makes
            (``HomeChange.principal``): its certificate's identity; default ``node:<node_id>``.
        join_timeout_s: How long ``start`` retries while etcd is unreachable or slow.
        catch_up_wait_s: How long an owner waits for the warm standby of a successor whose
            store is catching up (its node key says so) before it hands the shard over
            anyway (``warm_wait_s`` otherwise).
        dead_owner_probe: Revoke the lease of an owner whose address refuses connections
            (``report_unreachable``): a crashed process's shards are taken over at once,
            not after its lease's TTL.
    """

    def __init__(self, endpoint: str, node_id: str, region: str, address: str,
                 regions: list[str], shard_count: int = 256, lease_ttl_s: float = 5.0,
                 takeover_grace_s: float = 2.0, prefix: str = "/redledger", *,
                 rebalance: bool = True, campaign: bool = True,
                 sticky_failover: bool = True, warm_wait_s: float = WARM_WAIT_S,
                 join_timeout_s: float = JOIN_TIMEOUT_S, dead_owner_probe: bool = True,
                 catch_up_wait_s: float = CATCH_UP_WAIT_S,
                 failover_standbys: bool = True,
                 credentials: grpc.ChannelCredentials | None = None,
                 principal: str | None = None) -> None:
        if not regions:
            raise ValueError("regions must not be empty")
        if shard_count <= 0:
            raise ValueError("shard_count must be positive")
        if lease_ttl_s < 2.0:
            raise ValueError("lease_ttl_s must be at least 2 s (etcd's minimum lease TTL)")
        if takeover_grace_s <= 0:
            raise ValueError("takeover_grace_s must be positive")
        if not node_id or "/" in node_id:
            raise ValueError("node_id must be non-empty and contain no '/'")
        self._endpoints = parse_endpoints(endpoint)
        self.node_id = node_id
        self.region = region
        self.address = address
        self._regions = list(regions)
        self._shard_count = shard_count
        self._ttl_s = float(lease_ttl_s)
        self._grace_s = float(takeover_grace_s)
        self._keepalive_period_s = keepalive_period_s(self._ttl_s)
        self._rebalance = rebalance
        # campaign=False: a coordinator-only node. It reads the map and the owners (to route)
        # but takes no lease, registers no node key and never owns a shard.
        self._campaign_enabled = campaign
        # sticky_failover: shards taken over from a dead region stay (failback on command).
        self._sticky_failover = sticky_failover
        # How long an owner waits for its successor's warm standby before a planned hand-over
        # (0: no warm standbys); ``set_warmer`` gives this node's own.
        self._warm_wait_s = float(warm_wait_s)
        self._warmer: Callable[[set[int], set[int]], set[int]] | None = None
        self._join_timeout_s = float(join_timeout_s)
        self._catch_up_wait_s = float(catch_up_wait_s)
        self._catching_up = False  # what this node's key says (``set_catching_up``)
        self._dead_owner_probe = dead_owner_probe
        # Follow the shards this node would take over if their owner failed (with a warmer
        # only: ``shard_router.placement``, "Failover standby").
        self._failover_standbys = failover_standbys
        # Until when (monotonic) each probed address is left alone: inf while its probe runs.
        self._probe_quiet_until: dict[str, float] = {}
        # Leases of other nodes revoked because their address refused connections (/metrics).
        self.dead_owner_revocations = 0
        self._root = prefix.rstrip("/") + "/"
        self._credentials = credentials
        self.principal = principal or f"node:{node_id}"
        # Shards this node took over from a home region without a live node (/metrics).
        self.failovers = 0

        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Keep-alives get a thread of their own (module docstring): queued behind campaigns,
        # watches and releases in the shared pool (a takeover of many shards at once), or
        # behind a busy event loop, a keep-alive is sent late and the node gives up every
        # shard it holds (seen in drills at load).
        self._keepalive_thread: threading.Thread | None = None
        self._keepalive_stop = threading.Event()
        # Guards a session's ``deadline`` and ``suspended_at`` between that thread and the loop.
        self._lease_lock = threading.Lock()
        # When the event loop last ran its beat (monotonic; the keep-alive thread reads it).
        self._loop_beat = time.monotonic()
        # Beats later than LOOP_STALL_REPORT_S, and the longest lateness seen (/metrics).
        self.loop_stalls = 0
        self.longest_loop_stall_s = 0.0
        # The longest time between two keep-alives sent under one lease (the keep-alive
        # thread's own lateness included: a stalled process, a starved thread): how close
        # the node came to losing a lease it should have kept (/metrics).
        self.longest_keepalive_gap_s = 0.0
        # Set when the session is lost: the session loop opens a new one.
        self._need_session = asyncio.Event()
        self._resuming = False
        self._kv: Any = None      # client for unary calls
        self._watcher: Any = None  # separate client, so unary errors never tear down the watch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: OwnershipListener | None = None

        # Cache of etcd, fed by list + watch.
        self._homes: dict[int, str] = {}
        # Where a shard lived before an unplanned failover moved its home (for failback).
        self._origins: dict[int, str] = {}
        # The latest recorded changes of each shard's home (who, how, why), oldest first.
        self._changes: dict[int, list[HomeChange]] = {}
        # The region of the last owner seen per shard: a takeover is a failover (recorded,
        # failback on command) only if the shard was last served in its home region. A
        # region that has simply not started yet gets its shards back when it comes up.
        self._last_owner_region: dict[int, str] = {}
        self._owners: dict[int, _OwnerRecord] = {}
        self._nodes: dict[str, _NodeRecord] = {}
        self._absent_since: dict[int, float] = {}
        # Warm keys: shard -> the node holding a warm standby of it.
        self._warm_keys: dict[int, str] = {}
        # Shards this node owns and would release but for a successor not warm yet: since when.
        self._release_due_since: dict[int, float] = {}
        self._cache_rev = 0
        self._watch_gen = 0
        self._watch_id: int | None = None
        self._watch_broken = asyncio.Event()
        self._changed = asyncio.Event()
        # Called (on the event loop) whenever an owner key appears or goes in the cache.
        self._owner_listeners: list[Callable[[], None]] = []

        # This node's ownership.
        self._session: _Session | None = None
        # Set while the session's lease is confirmed; cleared while suspended. Owners wait on
        # it to serve again (``wait_lease_valid``).
        self._lease_ok = asyncio.Event()
        # Suspensions of this node's shards, and how many of them ended with the lease
        # confirmed (the shards served again) rather than lost (/metrics, tests).
        self.suspensions = 0
        self.resumptions = 0
        self.longest_suspension_s = 0.0  # of those that ended with the lease confirmed
        self._owned: dict[int, int] = {}
        self._rebalanced_at: dict[int, float] = {}
        self._hold_until: dict[int, float] = {}
        self._tails: dict[int, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- Ownership port --------------------------------------------------------------------

    async def start(self, listener: OwnershipListener) -> None:
        """Join: write the shard map if absent, watch, take a lease and campaign.

        Returns after the first round of campaigns, so shards won in it have been reported
        (their gain callbacks are scheduled; they run in order per shard).

        Raises:
            EtcdOwnershipError: etcd was unreachable or refused a request.
        """
        if self._loop is not None:
            raise RuntimeError("start() called twice")
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=ETCD_THREADS, thread_name_prefix=f"etcd-{self.node_id}")
        self._kv = self._client()
        self._watcher = self._client()
        try:
            await self._join()
        except _ETCD_ERRORS as exc:
            await self._shutdown(revoke=True)
            raise EtcdOwnershipError(f"cannot join etcd at {self._where()}") from exc
        if not self._campaign_enabled:
            self._tasks = [self._spawn_loop("watch", self._watch_loop, guards_lease=False)]
            return
        self._loop_beat = time.monotonic()
        self._keepalive_thread = threading.Thread(
            target=self._keepalive_thread_main, name=f"etcd-keepalive-{self.node_id}",
            daemon=True)
        self._keepalive_thread.start()
        self._tasks = [
            self._spawn_loop("beat", self._beat_loop, guards_lease=False),
            self._spawn_loop("session", self._session_loop, guards_lease=True),
            self._spawn_loop("watchdog", self._watchdog_loop, guards_lease=True),
            self._spawn_loop("watch", self._watch_loop, guards_lease=False),
            self._spawn_loop("reconcile", self._reconcile_loop, guards_lease=False),
        ]

    async def _join(self) -> None:
        """The steps of ``start``, each safe to repeat, retried for ``JOIN_TIMEOUT_S`` while
        etcd is unreachable or slow. One failed call was enough to fail an operator's command
        (``ledgerctl restore-homes`` in a CI drill, with every member up)."""
        deadline = time.monotonic() + self._join_timeout_s
        backoff = _Backoff()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._init_map()
                await self._relist_and_watch()
                if self._campaign_enabled:
                    await self._open_session()
                    await self._reconcile_once()
                return
            except _ETCD_TRANSIENT as exc:
                pause = backoff.grow()
                if time.monotonic() + pause >= deadline:
                    raise
                log.warning("%s: joining etcd at %s failed (attempt %d: %s); retrying in %.1f s",
                            self.node_id, self._where(), attempt, type(exc).__name__, pause)
                await asyncio.sleep(pause)

    async def close(self) -> None:
        """Report the loss of every shard, then revoke the lease so others take over at once."""
        await self._shutdown(revoke=True)

    async def abandon(self) -> None:
        """Stop as a crashed node would: no revoke, so others wait for the lease to expire.

        The listener still hears the losses (an in-process server must stop writing), but etcd
        is not told anything. Used by tests and chaos drills.
        """
        await self._shutdown(revoke=False)

    def set_warmer(self, warmer: Callable[[set[int], set[int]], set[int]]) -> None:
        """``warmer(shards, keep)`` keeps warm standbys of ``shards`` (the ones this node is
        next in line for) and of ``keep`` (those it campaigns for: released to it), drops
        the others, and returns those ready (``ledger.node.Node.warm_targets``); called on the
        event loop at every reconcile. Without one, this node warms nothing, and the owners
        of shards moving to it do not wait for it."""
        self._warmer = warmer

    def on_owner_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the event loop) whenever the cache sees a shard's owner key
        appear or go: the router's retries wake on it (``shard_router.router``)."""
        self._owner_listeners.append(callback)

    def catching_up_nodes(self) -> list[str]:
        """Live nodes whose key says their store is catching up with the other regions
        (moves to them wait: ``set_catching_up``), as last seen."""
        return sorted(n for n, rec in self._nodes.items() if rec.catching_up)

    def report_unreachable(self, address: str) -> asyncio.Task[bool] | None:
        """A call to the owner at ``address`` failed (the router saw a connection error).

        Probes the address (``DEAD_PROBES`` TCP connections): if every one is refused, the
        process that owned shards there is gone, and the lease of those owner keys is
        revoked, so that their shards are granted again at once, as after a clean shutdown,
        instead of after the TTL (fencing makes this as safe as any lease loss: a deposed
        owner that lives after all can append nothing). A connection made, a timeout or an
        unreachable host (a partition, a paused process: cases only the lease can judge)
        revokes nothing. Returns the probe's task (True: revoked), or None when no probe
        started: no owner there, this node's own address, one probe at a time per address,
        and none for ``DEAD_PROBE_QUIET_S`` after the last.
        """
        if (self._closed or not self._dead_owner_probe or self._loop is None
                or address == self.address
                or time.monotonic() < self._probe_quiet_until.get(address, 0.0)):
            return None
        leases = {rec.lease for rec in self._owners.values() if rec.address == address}
        if not leases:
            return None
        self._probe_quiet_until[address] = math.inf
        return spawn(self._probe_dead(address, leases), f"etcd-probe-{self.node_id}")

    async def _probe_dead(self, address: str, leases: set[int]) -> bool:
        try:
            host, port = parse_endpoints(address)[0]
            for attempt in range(DEAD_PROBES):
                if attempt:
                    await asyncio.sleep(DEAD_PROBE_GAP_S)  # a second look, not a wait
                if not await _refused(host, port):
                    return False
            current = {rec.lease for rec in self._owners.values() if rec.address == address}
            revoked = False
            for lease in sorted(leases & current):
                try:
                    await self._call(self._kv.revoke_lease, lease)
                except _ETCD_ERRORS as exc:
                    log.warning("node %s: could not revoke lease %x of the owner at %s, "
                                "which refuses connections: %s (its TTL will)",
                                self.node_id, lease, address, exc)
                    continue
                revoked = True
                self.dead_owner_revocations += 1
                log.warning("node %s: revoked lease %x of the owner at %s: %d connections "
                            "refused (its process is gone); its shards are granted again now",
                            self.node_id, lease, address, DEAD_PROBES)
            return revoked
        finally:
            self._probe_quiet_until[address] = time.monotonic() + DEAD_PROBE_QUIET_S

    def _owner_changed(self) -> None:
        for callback in self._owner_listeners:
            try:
                callback()
            except Exception:  # a listener's bug must not stop the watch
                log.exception("node %s: owner change listener failed", self.node_id)

    def owner(self, shard: int) -> OwnerInfo | None:
        rec = self._owners.get(shard)
        if rec is None:
            return None
        return OwnerInfo(shard=shard, node_id=rec.node_id, region=rec.region,
                         address=rec.address, epoch=rec.epoch)

    def placements(self) -> list[ShardPlacement]:
        return [ShardPlacement(shard=s, home_region=self._home(s))
                for s in range(self._shard_count)]

    # -- Extras: planned moves, draining, introspection --------------------------------------

    def owned(self) -> dict[int, int]:
        """Shards this node serves now: shard -> epoch."""
        return dict(self._owned)

    def live_nodes(self) -> dict[str, str]:
        """Live nodes as last seen: node id -> region."""
        return {n: rec.region for n, rec in self._nodes.items()}

    async def set_home(self, shard: int, region: str) -> None:
        """Move ``shard``'s home to ``region``. The current owner hands it over once a node
        of ``region`` is live and stable; that node then campaigns.

        Raises:
            ValueError: unknown shard or region.
            EtcdOwnershipError: etcd refused or was unreachable.
        """
        await self.set_homes({shard: region})

    def origin(self, shard: int) -> str | None:
        """The region a shard lived in before an unplanned failover took it away."""
        return self._origins.get(shard)

    def home_changes(self, shard: int) -> list[HomeChange]:
        """The latest changes of ``shard``'s home as last seen (who, how, why), oldest
        first."""
        return list(self._changes.get(shard, ()))

    async def set_homes(self, mapping: dict[int, str],
                        origins: dict[int, str] | None = None, *,
                        action: str = "MoveShard", reason: str = "") -> str:
        """Move many shards' homes, one transaction per chunk of ``TXN_OPS_MAX``.

        ``origins`` records, per shard, the region it is moved away from after a failover
        (``ledgerctl failback`` moves such shards home again); omitted, it is cleared. Every
        entry gets the change appended to its list (``HomeChange``: this object's
        ``principal``, ``action``, ``reason``, one id for the whole call), which the shard's
        next owner records in its audit chain. Returns the change id."""
        for shard, region in mapping.items():
            self._check_shard(shard)
            if region not in self._regions:
                raise ValueError(f"unknown region {region!r}")
        items = sorted(mapping.items())
        change_id = uuid.uuid4().hex
        at_ms = int(time.time() * 1000)

        def entry(shard: int, region: str) -> str:
            change = HomeChange(change_id, self.principal, action, self._home(shard), region,
                                at_ms, reason)
            kept = [*self._changes.get(shard, ()), change][-HOME_CHANGES_KEPT:]
            return json.dumps({"home_region": region,
                               **({"origin": origins[shard]} if origins and shard in origins
                                  else {}),
                               "changes": [c.as_doc() for c in kept]})

        try:
            for chunk in _chunks(items, TXN_OPS_MAX):
                puts = [etcd_txn.Put(self._map_key(s), entry(s, r)) for s, r in chunk]
                await self._call(self._kv.transaction, compare=[], success=puts, failure=[])
        except _ETCD_ERRORS as exc:
            raise EtcdOwnershipError("cannot update the shard map") from exc
        return change_id

    async def release(self, shard: int) -> None:
        """Give ``shard`` up (for draining): report the loss, then delete the owner key.

        This node then leaves the shard to others for
        ``shard_router.placement.RELEASE_HOLD_GRACES`` grace periods.
        Does nothing if this node does not own the shard.
        """
        self._check_shard(shard)
        self._hold_until[shard] = time.monotonic() + release_hold_s(self._grace_s)
        if shard in self._owned:
            await self._release_many([shard], rebalanced=False)

    # -- Keys and cache ----------------------------------------------------------------------

    def _map_key(self, shard: int) -> str:
        return f"{self._root}map/{shard:05d}"

    def _owner_key(self, shard: int) -> str:
        return f"{self._root}owner/{shard:05d}"

    def _warm_key(self, shard: int) -> str:
        return f"{self._root}warm/{shard:05d}"

    def _node_key(self) -> str:
        return f"{self._root}nodes/{self.node_id}"

    def _home(self, shard: int) -> str:
        return self._homes.get(shard) or default_home(shard, self._regions)

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self._shard_count:
            raise ValueError(f"shard {shard} out of range 0..{self._shard_count - 1}")

    def _where(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self._endpoints)

    def _client(self) -> Any:
        return etcd_client(self._endpoints, ETCD_RPC_TIMEOUT_S, self._credentials)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._loop is None or self._executor is None:
            raise RuntimeError("EtcdOwnership used before start() or after close()")
        return await self._loop.run_in_executor(self._executor,
                                                functools.partial(fn, *args, **kwargs))

    def _apply_kv(self, key: bytes, value: bytes, create_rev: int, lease: int, deleted: bool,
                  now: float) -> None:
        """Fold one key's state into the cache. Malformed keys and values are skipped."""
        name = key.decode(errors="replace")
        if not name.startswith(self._root):
            return
        kind, _, rest = name[len(self._root):].partition("/")
        try:
            if kind == "nodes":
                if deleted:
                    self._nodes.pop(rest, None)
                    return
                doc = json.loads(value)
                known = self._nodes.get(rest)
                record = _NodeRecord(str(doc["region"]), str(doc.get("address", "")),
                                     known.first_seen if known else now,
                                     bool(doc.get("warms", False)),
                                     bool(doc.get("catching_up", False)))
                self._nodes[rest] = record
                if known is not None and known.catching_up and not record.catching_up:
                    # A successor that has just caught up gets its whole warm bound from now
                    # to warm up: counted from the start of the wait, it had long passed, and
                    # the shards went to it cold (drill: full loads of 122-1,315 batches, 2 s
                    # after it said it had caught up).
                    self._release_due_since = {s: now for s in self._release_due_since}
                return
            shard = int(rest)
            if not 0 <= shard < self._shard_count:
                return
            if kind == "warm":
                if deleted:
                    self._warm_keys.pop(shard, None)
                else:
                    self._warm_keys[shard] = str(json.loads(value)["node_id"])
                return
            if kind == "map":
                if deleted:
                    self._homes.pop(shard, None)
                    self._origins.pop(shard, None)
                    self._changes.pop(shard, None)
                else:
                    doc = json.loads(value)
                    self._homes[shard] = str(doc["home_region"])
                    if doc.get("changes"):
                        self._changes[shard] = [HomeChange.from_doc(c)
                                                for c in doc["changes"]]
                    else:
                        self._changes.pop(shard, None)
                    if doc.get("origin"):
                        self._origins[shard] = str(doc["origin"])
                    else:
                        self._origins.pop(shard, None)
            elif kind == "owner":
                if deleted:
                    self._owners.pop(shard, None)
                    self._absent_since[shard] = now
                else:
                    doc = json.loads(value)
                    self._owners[shard] = _OwnerRecord(
                        str(doc["node_id"]), str(doc.get("region", "")),
                        str(doc.get("address", "")), create_rev, lease)
                    self._absent_since.pop(shard, None)
                    self._last_owner_region[shard] = str(doc.get("region", ""))
                self._owner_changed()
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed etcd key %s", name)

    async def _relist_and_watch(self) -> None:
        """Rebuild the cache from one consistent read, then watch from the next revision."""
        self._watch_gen += 1
        gen = self._watch_gen
        old_watch, self._watch_id = self._watch_id, None
        if old_watch is not None:
            try:
                await self._call(self._watcher.cancel_watch, old_watch)
            except _ETCD_ERRORS:
                pass  # The stream it lived on is gone anyway.
        response = await self._call(self._kv.get_prefix_response, self._root)
        now = time.monotonic()
        old_absent, old_nodes = self._absent_since, self._nodes
        self._homes, self._owners, self._nodes, self._changes = {}, {}, {}, {}
        for kv in response.kvs:
            self._apply_kv(kv.key, kv.value, kv.create_revision, kv.lease, False, now)
        for name, rec in self._nodes.items():
            if name in old_nodes:
                rec.first_seen = old_nodes[name].first_seen
        self._absent_since = {s: old_absent.get(s, now) for s in range(self._shard_count)
                              if s not in self._owners}
        self._cache_rev = response.header.revision
        loop = self._loop
        if loop is None:
            raise RuntimeError("EtcdOwnership used before start()")

        def on_response(resp: Any) -> None:  # runs on pyetcd's watch thread
            try:
                loop.call_soon_threadsafe(self._on_watch, gen, resp)
            except RuntimeError:
                pass  # The loop is closed: this node is gone.

        self._watch_id = await self._call(
            self._watcher.add_watch_prefix_callback, self._root, on_response,
            start_revision=self._cache_rev + 1)
        self._changed.set()

    def _on_watch(self, gen: int, resp: Any) -> None:
        if gen != self._watch_gen or self._closed:
            return  # A response of a watch we replaced.
        events = getattr(resp, "events", None)
        if events is None:
            # pyetcd reports a broken stream, a compaction or a shutdown as an exception or
            # None in place of a response; any of them means re-list and watch again.
            log.info("etcd watch of %s ended (%r); re-listing", self.node_id, resp)
            self._watch_broken.set()
            return
        now = time.monotonic()
        for ev in events:
            deleted = isinstance(ev, etcd_events.DeleteEvent)
            self._apply_kv(ev.key, ev.value, ev.create_revision, ev.lease, deleted, now)
        self._cache_rev = max(self._cache_rev, resp.header.revision)
        self._changed.set()

    # -- Background loops --------------------------------------------------------------------

    def _spawn_loop(self, what: str, body: Callable[[], Any], *,
                    guards_lease: bool) -> asyncio.Task[None]:
        """Start a background loop that is restarted, never lost, when it fails."""
        return spawn(self._supervised(what, body, guards_lease=guards_lease),
                     f"etcd-{what}-{self.node_id}")

    async def _supervised(self, what: str, body: Callable[[], Any], *,
                          guards_lease: bool) -> None:
        """Run the loop ``body`` until close; log a failure and start it again after a backoff.

        The loops retry etcd errors themselves, so what reaches here is a bug. A loop that
        guards the lease (keep-alives, the watchdog) may have left it unwatched while it was
        down, so this node first gives up every shard (the lease is renewed under a new
        session and the shards are won again), exactly as if its keep-alives had been late.
        """
        backoff = _Backoff()
        while not self._closed:
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node %s: etcd %s loop failed; restarting it in %.1f s",
                              self.node_id, what, backoff.s)
                session = self._session
                if guards_lease and session is not None and not session.lost:
                    self._lose_session(session, f"the {what} loop failed")
            await backoff.sleep()

    async def _watch_loop(self) -> None:
        while not self._closed:
            await self._watch_broken.wait()
            self._watch_broken.clear()
            backoff = _Backoff()
            while not self._closed:
                try:
                    await self._relist_and_watch()
                    break
                except _ETCD_ERRORS as exc:
                    log.warning("etcd re-list failed for %s: %r", self.node_id, exc)
                    await backoff.sleep()

    async def _open_session(self) -> None:
        """Revoke the previous lease (best effort), take a new one and register this node."""
        old = self._session
        if old is not None:
            try:
                await self._call(self._kv.revoke_lease, old.lease_id)
            except _ETCD_ERRORS:
                pass  # Expired already, or etcd is away: its keys go at TTL or as stale keys.
        sent_at = time.monotonic()
        lease = await self._call(self._kv.lease, math.ceil(self._ttl_s))
        session = _Session(lease.id, opened_at=sent_at, deadline=lease_deadline(
            sent_at=sent_at, ttl_granted_s=float(lease.ttl), ttl_s=self._ttl_s))
        try:
            await self._call(self._kv.put, self._node_key(), self._node_doc(), lease=lease.id)
        except _ETCD_ERRORS:
            try:
                await self._call(self._kv.revoke_lease, lease.id)
            except _ETCD_ERRORS:
                pass
            raise
        self._session = session
        self._changed.set()
        self._lease_ok.set()
        log.info("node %s holds lease %x", self.node_id, lease.id)

    def _node_doc(self) -> str:
        return json.dumps({"region": self.region, "address": self.address,
                           "warms": self._warmer is not None,
                           "catching_up": self._catching_up})

    async def set_catching_up(self, catching_up: bool) -> None:
        """Say in this node's key whether its store is catching up with the other regions
        (``ledger.node``): an owner that would hand a shard to this node then waits up to
        ``catch_up_wait_s`` for its warm standby instead of ``warm_wait_s``, so that a
        failback does not land on a region whose Cassandra still replays what it missed.
        Best effort: etcd unreachable leaves the key as it was until the next change."""
        if catching_up == self._catching_up:
            return
        self._catching_up = catching_up
        session = self._session
        if session is None or session.lost or self._closed:
            return  # the next session's node key says it
        try:
            await self._call(self._kv.put, self._node_key(), self._node_doc(),
                             lease=session.lease_id)
        except _ETCD_ERRORS as exc:
            log.warning("node %s: could not say catching_up=%s in etcd: %s", self.node_id,
                        catching_up, exc)
            self._catching_up = not catching_up  # so that the next call tries again

    def _refresh(self, lease_id: int) -> int | None:
        for response in self._kv.refresh_lease(lease_id):
            return int(response.TTL)
        return None

    async def _session_loop(self) -> None:
        """Open a new session whenever there is none (at start, or after a loss)."""
        backoff = _Backoff()
        while not self._closed:
            self._need_session.clear()
            session = self._session
            if session is not None and not session.lost:
                await self._need_session.wait()
                continue
            try:
                await self._open_session()
                backoff.reset()
            except _ETCD_ERRORS as exc:
                log.warning("node %s cannot get a lease: %r", self.node_id, exc)
                await backoff.sleep()

    async def _beat_loop(self) -> None:
        """Note every LOOP_BEAT_S that the event loop runs, and how late each note was
        (the first note was due when ``start()`` set ``_loop_beat``)."""
        due = self._loop_beat
        while not self._closed:
            now = time.monotonic()
            late_s = now - due
            if late_s >= LOOP_STALL_REPORT_S:
                self.loop_stalls += 1
                log.warning("node %s: event loop stalled %.2f s", self.node_id, late_s)
            self.longest_loop_stall_s = max(self.longest_loop_stall_s, late_s)
            self._loop_beat = now
            due = now + LOOP_BEAT_S
            await asyncio.sleep(LOOP_BEAT_S)

    def _keepalive_thread_main(self) -> None:
        """Renew the session's lease until close (runs on its own thread).

        Every answer goes to the loop (``_keepalive_answered``); a confirmed lease extends
        the deadline here at once, so a busy loop does not cost it. Nothing is sent while the
        loop has not run for LOOP_STALL_MAX_S, and nothing here may end the thread: an
        unexpected error is handed to the loop like an answer.
        """
        stop = self._keepalive_stop
        wedged = False
        backoff = _Backoff()
        last: tuple[int, float] | None = None  # (lease, send time) of the last keep-alive
        while not stop.is_set():
            session = self._session
            if session is None or session.lost:
                stop.wait(RETRY_BACKOFF_S_MIN)  # the session loop opens a new one
                continue
            stalled_s = time.monotonic() - self._loop_beat
            if stalled_s > LOOP_STALL_MAX_S:
                if not wedged:
                    log.error("node %s: event loop has not run for %.1f s; keep-alives stop "
                              "until it does (its shards go at the TTL)", self.node_id,
                              stalled_s)
                wedged = True
                stop.wait(LOOP_BEAT_S)
                continue
            wedged = False
            # The deadline counts from the send time: etcd received the keep-alive later, so
            # its lease expiry is later than ours.
            sent_at = time.monotonic()
            if last is not None and last[0] == session.lease_id:
                gap_s = sent_at - last[1]
                self.longest_keepalive_gap_s = max(self.longest_keepalive_gap_s, gap_s)
                if gap_s > KEEPALIVE_GAP_REPORT_TTLS * self._ttl_s:
                    log.warning("node %s: keep-alive sent %.2f s after the previous one "
                                "(lease %.1f s)", self.node_id, gap_s, self._ttl_s)
            last = (session.lease_id, sent_at)
            ttl: int | None = None
            error: BaseException | None = None
            try:
                ttl = self._refresh(session.lease_id)
            except Exception as exc:  # etcd errors, and bugs: the loop decides (_answered)
                error = exc
            if ttl:
                deadline = lease_deadline(sent_at=sent_at, ttl_granted_s=float(ttl),
                                          ttl_s=self._ttl_s)
                with self._lease_lock:
                    if session.suspended_at is None and not session.lost:
                        session.deadline = max(session.deadline, deadline)
            else:
                deadline = 0.0
            loop = self._loop
            if loop is None or stop.is_set():
                return
            try:
                loop.call_soon_threadsafe(self._keepalive_answered, session, ttl, deadline,
                                          error)
            except RuntimeError:  # the loop closed under us: the node is going away
                return
            if session.suspended_at is not None and not session.lost:
                stop.wait(SUSPENDED_RETRY_S)
            elif ttl:
                backoff.reset()
                stop.wait(self._keepalive_period_s)
            else:
                # Retry soon, so one lost keep-alive does not cost the lease, but back off so a
                # long etcd outage does not become a busy loop.
                stop.wait(min(backoff.grow(), self._keepalive_period_s))

    def _keepalive_answered(self, session: _Session, ttl: int | None, deadline: float,
                            error: BaseException | None) -> None:
        """A keep-alive's answer, on the loop: wake the owners waiting on it, resume a
        suspended session, or give the shards up (the lease is gone at etcd, or the
        keep-alive hit a bug: the lease may have gone unwatched)."""
        if self._closed or session is not self._session or session.lost:
            return
        if error is not None and not isinstance(error, _ETCD_ERRORS):
            log.error("node %s: etcd keepalive loop failed", self.node_id, exc_info=error)
            self._lose_session(session, "the keepalive loop failed")
            return
        if error is not None:
            log.warning("node %s keep-alive failed: %r", self.node_id, error)
            return
        if ttl is None:
            return
        if ttl <= 0:
            self._lose_session(session, "lease expired at etcd")
        elif session.suspended_at is None:
            self._lease_ok.set()
        elif not self._resuming:
            self._resuming = True
            spawn(self._resume_once(session, deadline), f"etcd-resume-{self.node_id}")

    async def _resume_once(self, session: _Session, deadline: float) -> None:
        try:
            await self._resume(session, deadline)
        except Exception:  # a bug: the lease is unwatched, as in a failed guarding loop
            log.exception("node %s: etcd resume failed", self.node_id)
            if session is self._session and not session.lost:
                self._lose_session(session, "resuming the lease failed")
        finally:
            self._resuming = False

    async def _watchdog_loop(self) -> None:
        """Suspend every shard once the local lease deadline passes without a keep-alive."""
        while not self._closed:
            session = self._session
            now = time.monotonic()
            if session is None or session.lost:
                await asyncio.sleep(RETRY_BACKOFF_S_MIN)
                continue
            if now >= session.deadline:
                if session.suspended_at is None and not self._suspend(session, now):
                    continue  # the keep-alive thread extended the deadline meanwhile
                # Until the keep-alive loop resumes the session, or loses it.
                await self._lease_ok.wait()
                continue
            await asyncio.sleep(session.deadline - now)

    def _suspend(self, session: _Session, now: float) -> bool:
        """Suspend ``session`` if its deadline has passed (the keep-alive thread may have
        just extended it); say whether it did."""
        with self._lease_lock:
            if now < session.deadline:
                return False
            session.suspended_at = now
        self._lease_ok.clear()
        self.suspensions += 1
        log.warning("node %s suspends %d shards: keep-alives late, the lease may expire; "
                    "they serve again if etcd confirms it", self.node_id, len(self._owned))
        return True

    async def _resume(self, session: _Session, deadline: float) -> None:
        """The lease of a suspended session is alive at etcd: serve again every shard whose
        owner key still names this node with its epoch (one linearizable read), report the
        loss of any other. A failed read leaves the session suspended (tried again)."""
        try:
            response = await self._call(self._kv.get_prefix_response, self._root + "owner/")
        except _ETCD_ERRORS as exc:
            log.warning("node %s: owner keys not read after the lease was confirmed: %r",
                        self.node_id, exc)
            return
        if session is not self._session or session.lost or session.suspended_at is None:
            return
        # A key on this session's lease is this node's; its create revision is the epoch.
        held = {kv.key: kv.create_revision for kv in response.kvs
                if kv.lease == session.lease_id}
        lost = sorted(s for s, epoch in self._owned.items()
                      if held.get(self._owner_key(s).encode()) != epoch)
        for shard in lost:
            self._owned.pop(shard, None)
            self._notify(shard, 0)
        suspended_s = time.monotonic() - session.suspended_at
        with self._lease_lock:
            session.suspended_at = None
            session.deadline = max(session.deadline, deadline)
        self.resumptions += 1
        self.longest_suspension_s = max(self.longest_suspension_s, suspended_s)
        self._lease_ok.set()
        self._changed.set()
        log.warning("node %s resumes %d shards after %.2f s suspended: etcd confirmed the "
                    "lease%s", self.node_id, len(self._owned), suspended_s,
                    f"; lost {lost} (owner keys changed)" if lost else "")

    def lease_valid_for(self, seconds: float) -> bool:
        """``lease_valid()`` now and for ``seconds`` more, without another keep-alive."""
        session = self._session
        return (session is not None and not session.lost and session.suspended_at is None
                and time.monotonic() + seconds < session.deadline)

    async def confirm_held(self, shard: int, epoch: int) -> bool:
        """For a journal write that ended after the local deadline: wait until etcd confirms
        the lease (the next answered keep-alive, or a suspension resumed) and say whether
        this node still holds ``shard`` with ``epoch``. False as soon as it does not (the
        shard reported lost, the lease gone): its write is then never acknowledged."""
        while True:
            session = self._session
            if self._owned.get(shard) != epoch or session is None or session.lost:
                return False
            if self.lease_valid():
                return True
            await self._next_lease_answer()

    async def wait_lease_valid(self, for_s: float = 0.0) -> None:
        """Return once ``lease_valid_for(for_s)`` holds: at once while it does; else after
        the next answered keep-alive, etcd confirming the lease of a suspended session, or a
        new session (the old one's shards are reported lost first: their owners are stopped
        while they wait, not resumed)."""
        while not self.lease_valid_for(for_s):
            await self._next_lease_answer()

    async def _next_lease_answer(self) -> None:
        """Wait for the next answered keep-alive, a resumption or a new session (each sets
        ``_lease_ok``). Not suspended (yet), the event is still set from the last answer:
        clear it first."""
        self._lease_ok.clear()
        await self._lease_ok.wait()

    def lease_valid(self) -> bool:
        """True while this node's lease is surely alive at etcd (before the local deadline).

        Owners check it before answering: a node paused past its lease (SIGSTOP, a long GC)
        must not answer as owner after it resumes, even before the watchdog reports the loss.
        """
        session = self._session
        return (session is not None and not session.lost and session.suspended_at is None
                and time.monotonic() < session.deadline)

    def _lose_session(self, session: _Session, reason: str) -> None:
        session.lost = True
        if self._owned:
            log.warning("node %s gives up %d shards: %s", self.node_id, len(self._owned), reason)
        self._lose_all()
        self._changed.set()
        self._need_session.set()
        self._lease_ok.set()  # wakes the watchdog; owners waiting on it are being stopped

    def _lose_all(self) -> None:
        owned, self._owned = self._owned, {}
        for shard in sorted(owned):
            self._notify(shard, 0)

    async def _reconcile_loop(self) -> None:
        tick_s = min(RECONCILE_TICK_S_MAX, self._grace_s / 4)
        backoff = _Backoff()
        while not self._closed:
            # asyncio.timeout rather than wait_for: on Python 3.11, wait_for can swallow a
            # cancellation that arrives as the inner wait completes, and close() would hang.
            try:
                async with asyncio.timeout(tick_s):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            try:
                await self._reconcile_once()
                backoff.reset()
            except _ETCD_ERRORS as exc:
                log.warning("node %s reconcile failed: %r", self.node_id, exc)
                await backoff.sleep()

    async def _reconcile_once(self) -> None:
        session = self._session
        if session is None or session.lost or session.suspended_at is not None:
            return  # suspended: nothing is decided until etcd confirms the lease (_resume)
        now = time.monotonic()
        live = {n: (rec.region, now - rec.first_seen) for n, rec in self._nodes.items()}
        live[self.node_id] = (self.region, now - session.opened_at)
        actions = plan((self._view(shard, now) for shard in range(self._shard_count)),
                       me=self.node_id, my_region=self.region, live_for_s=live,
                       grace_s=self._grace_s, rebalance=self._rebalance,
                       warm_wait_s=self._warm_wait_s,
                       warming_nodes={n for n, rec in self._nodes.items() if rec.warms}
                       | ({self.node_id} if self._warmer is not None else set()),
                       catch_up_wait_s=self._catch_up_wait_s,
                       catching_up_nodes={n for n, rec in self._nodes.items()
                                          if rec.catching_up},
                       failover_standbys=self._failover_standbys and self._warmer is not None)
        waiting = set(actions[Action.WAIT_WARM])
        for shard in [s for s in self._release_due_since if s not in waiting]:
            del self._release_due_since[shard]
        for shard in waiting:
            self._release_due_since.setdefault(shard, now)
        # Standbys of shards we campaign for, and of those just won (their gain is delivered
        # to the node by a task of its own, maybe after the next reconcile), are kept.
        await self._announce_warm(set(actions[Action.WARM]),
                                  set(actions[Action.CAMPAIGN]) | set(self._owned), session,
                                  standby=set(actions[Action.STANDBY]))
        # Epochs of stale keys are taken now: the cache may change during the awaits below.
        stale_epochs = {shard: self._owners[shard].epoch for shard in actions[Action.CLEAN_STALE]
                        if shard in self._owners}
        for shard in actions[Action.LOST]:
            log.warning("node %s lost shard %d (owner key changed)", self.node_id, shard)
            self._owned.pop(shard, None)
            self._notify(shard, 0)
        if actions[Action.RELEASE]:
            await self._release_many(actions[Action.RELEASE], rebalanced=False)
        if actions[Action.REBALANCE]:
            await self._release_many(actions[Action.REBALANCE], rebalanced=True)
        if stale_epochs:
            await self._delete_owner_keys(stale_epochs)
        if actions[Action.CAMPAIGN]:
            await self._campaign(actions[Action.CAMPAIGN], session)

    def _view(self, shard: int, now: float) -> ShardView:
        """What the placement policy looks at for ``shard``, from the watch cache."""
        rec = self._owners.get(shard)
        absent_since = self._absent_since.get(shard)
        rebalanced_at = self._rebalanced_at.get(shard)
        return ShardView(
            shard=shard, home_region=self._home(shard),
            owner_node_id=rec.node_id if rec else None,
            owner_epoch=rec.epoch if rec else 0,
            absent_for_s=now - absent_since if absent_since is not None and not rec else 0.0,
            my_epoch=self._owned.get(shard, 0),
            since_rebalance_s=math.inf if rebalanced_at is None else now - rebalanced_at,
            held=self._hold_until.get(shard, 0.0) > now,
            served_at_home=self._last_owner_region.get(shard) == self._home(shard),
            owner_region=rec.region if rec else "",
            warm_node_id=self._warm_keys.get(shard),
            release_due_for_s=(now - self._release_due_since[shard]
                               if shard in self._release_due_since else 0.0))

    async def _announce_warm(self, targets: set[int], campaigning: set[int],
                             session: _Session, standby: AbstractSet[int] = frozenset()) -> None:
        """Have this node's warmer keep standbys of ``targets`` and ``standby`` (the shards
        it would take over if their owner failed; nobody waits for those, so they are not
        announced), and keep those of shards it is about to campaign for; put a warm key (on
        our lease) for each target ready, and delete ours of shards no longer warm here."""
        ready = (self._warmer(targets | standby, campaigning) & targets
                 if self._warmer is not None else set())
        mine = {s for s, n in self._warm_keys.items() if n == self.node_id}
        doc = json.dumps({"node_id": self.node_id})
        ops = [etcd_txn.Put(self._warm_key(s), doc, lease=session.lease_id)
               for s in sorted(ready - mine)]
        ops += [etcd_txn.Delete(self._warm_key(s)) for s in sorted(mine - ready)]
        for chunk in _chunks(ops, TXN_OPS_MAX):
            await self._call(self._kv.transaction, compare=[], success=list(chunk), failure=[])

    # -- Election steps ----------------------------------------------------------------------

    async def _campaign(self, shards: list[int], session: _Session) -> None:
        """Try to win ``shards``: one create-if-absent sub-transaction per shard."""
        owner_doc = json.dumps({"node_id": self.node_id, "region": self.region,
                                "address": self.address})
        taken_over: list[int] = []
        # Where each shard was served last is taken now, before the cache learns of our own
        # wins: that is what tells a failover from a region that simply had not started.
        served_at_home = {s for s in shards
                          if self._last_owner_region.get(s) == self._home(s)}
        for chunk in _chunks(shards, TXN_OPS_MAX):
            subs = [etcd_txn.Txn(compare=[etcd_txn.Create(self._owner_key(s)) == 0],
                                 success=[etcd_txn.Put(self._owner_key(s), owner_doc,
                                                       lease=session.lease_id),
                                          etcd_txn.Get(self._owner_key(s))],
                                 failure=[])
                    for s in chunk]
            _, responses = await self._call(self._kv.transaction, compare=[], success=subs,
                                            failure=[])
            for shard, response in zip(chunk, responses):
                sub = response.response_txn
                if not sub.succeeded:
                    continue  # Someone else won; the watch tells us who.
                kv = sub.responses[1].response_range.kvs[0]
                # The cache may already hold newer news of this key from the watch.
                if kv.mod_revision > self._cache_rev:
                    self._apply_kv(kv.key, kv.value, kv.create_revision, kv.lease, False,
                                   time.monotonic())
                # A win that comes back after the deadline is not served: the lease may be
                # gone. The key is then cleaned up as stale under the next lease.
                if (session is self._session and not session.lost
                        and time.monotonic() < session.deadline and not self._closed):
                    self._owned[shard] = kv.create_revision
                    self._notify(shard, kv.create_revision)
                    if is_failover(home_region=self._home(shard), my_region=self.region,
                                   served_at_home=shard in served_at_home,
                                   sticky=self._sticky_failover):
                        taken_over.append(shard)
        if taken_over:
            # An unplanned failover: the shard now lives here until an operator moves it
            # back (`ledgerctl failback`), so a region that flaps does not drag its shards
            # back and forth. The old home is kept as the origin.
            origins = {s: self._home(s) for s in taken_over}
            self.failovers += len(taken_over)
            try:
                await self.set_homes({s: self.region for s in taken_over}, origins,
                                     action="AutoFailover",
                                     reason="the home region had no live node")
                log.warning("node %s took over shards %s from %s", self.node_id, taken_over,
                            sorted(set(origins.values())))
            except EtcdOwnershipError:
                log.warning("node %s could not record the failover of shards %s; they will "
                            "return to their home region when it is back", self.node_id,
                            taken_over)

    async def _release_many(self, shards: list[int], *, rebalanced: bool) -> None:
        """Hand shards over: report each loss and wait for it, then delete the owner keys."""
        epochs: dict[int, int] = {}
        deliveries = []
        now = time.monotonic()
        for shard in shards:
            epoch = self._owned.pop(shard, 0)
            if not epoch:
                continue
            epochs[shard] = epoch
            if rebalanced:
                self._rebalanced_at[shard] = now
            deliveries.append(self._notify(shard, 0))
        if deliveries:
            await asyncio.wait(deliveries)
        await self._delete_owner_keys(epochs)

    async def _delete_owner_keys(self, epochs: Mapping[int, int]) -> None:
        """Delete owner keys, each only if it still carries the given epoch."""
        items = sorted(epochs.items())
        for chunk in _chunks(items, TXN_OPS_MAX):
            subs = [etcd_txn.Txn(compare=[etcd_txn.Create(self._owner_key(s)) == epoch],
                                 success=[etcd_txn.Delete(self._owner_key(s))], failure=[])
                    for s, epoch in chunk]
            await self._call(self._kv.transaction, compare=[], success=subs, failure=[])

    async def _init_map(self) -> None:
        """Create every absent shard-map key; present keys are left as they are."""
        shards = list(range(self._shard_count))
        for chunk in _chunks(shards, TXN_OPS_MAX):
            subs = [etcd_txn.Txn(
                compare=[etcd_txn.Create(self._map_key(s)) == 0],
                success=[etcd_txn.Put(self._map_key(s), json.dumps(
                    {"home_region": default_home(s, self._regions)}))],
                failure=[]) for s in chunk]
            await self._call(self._kv.transaction, compare=[], success=subs, failure=[])

    # -- Listener delivery -------------------------------------------------------------------

    def _notify(self, shard: int, epoch: int) -> asyncio.Task[None]:
        """Schedule ``listener(shard, epoch)`` after every earlier callback for that shard."""
        previous = self._tails.get(shard)
        # Kept in ``_tails`` until it ends; ``_deliver`` logs a failing listener itself and
        # ``spawn`` logs anything else, so no report of a gain or loss fails unseen.
        task = spawn(self._deliver(previous, shard, epoch),
                     f"etcd-notify-{self.node_id}-{shard}-{epoch}")
        self._tails[shard] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._tails.get(shard) is done:
                del self._tails[shard]

        task.add_done_callback(forget)
        return task

    async def _deliver(self, previous: asyncio.Task[None] | None, shard: int,
                       epoch: int) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # Never raises, and never cancels the previous one.
        if self._listener is None:
            raise RuntimeError("EtcdOwnership reports ownership before start()")
        try:
            await self._listener(shard, epoch)
        except Exception:
            log.exception("ownership listener failed for shard %d epoch %d", shard, epoch)

    # -- Shutdown ----------------------------------------------------------------------------

    async def _shutdown(self, *, revoke: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._keepalive_stop.set()
        if self._campaign_enabled and self._loop is not None:
            log.info("node %s: longest keep-alive gap %.2f s (lease %.1f s), longest event loop "
                     "stall %.2f s (%d over %.1f s), %d suspensions, %d resumed",
                     self.node_id, self.longest_keepalive_gap_s, self._ttl_s,
                     self.longest_loop_stall_s, self.loop_stalls, LOOP_STALL_REPORT_S,
                     self.suspensions, self.resumptions)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a loop stuck in a call returns within ETCD_RPC_TIMEOUT_S anyway, and
            # the loops also stop on ``_closed``.
            _, stuck = await asyncio.wait(self._tasks, timeout=TASK_STOP_TIMEOUT_S)
            for task in stuck:
                log.warning("node %s: %s did not stop", self.node_id, task.get_name())
        self._tasks = []
        self._lose_all()
        pending = list(self._tails.values())
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_LISTENER_TIMEOUT_S)
        session, self._session = self._session, None
        if self._executor is not None:
            # A lost session is revoked too: its loss is reported already, and revoking frees
            # its shards at once instead of at TTL.
            if revoke and session is not None:
                try:
                    await self._call(self._kv.revoke_lease, session.lease_id)
                except _ETCD_ERRORS as exc:
                    log.warning("node %s could not revoke its lease: %r", self.node_id, exc)
            executor, self._executor = self._executor, None
            keepalive, self._keepalive_thread = self._keepalive_thread, None
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(self._close_clients, executor, keepalive))

    def _close_clients(self, executor: concurrent.futures.ThreadPoolExecutor,
                       keepalive: threading.Thread | None) -> None:
        executor.shutdown(wait=True)
        if keepalive is not None:
            # Its keep-alive call gives up within ETCD_RPC_TIMEOUT_S; it sends no other.
            keepalive.join(timeout=ETCD_RPC_TIMEOUT_S + 1.0)
        for client in (self._watcher, self._kv):
            if client is not None:
                try:
                    client.close()
                except Exception:  # Closing a channel that failed may raise; nothing to do.
                    log.debug("closing etcd client failed", exc_info=True)
