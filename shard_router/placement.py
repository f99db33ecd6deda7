"""Shard placement policy: which node should serve which shard, as pure functions.

Nothing here does I/O, reads a clock or touches asyncio: every function takes plain data (what
a node knows at one moment, with times as durations already measured) and returns a decision.
The etcd adapter (``shard_router.etcd``) gathers that data from its watch cache, calls these
functions, and carries the decisions out; ``tests/unit/test_placement.py`` checks every rule.

The rules, in the order a shard meets them:

* **Home region first.** A fresh shard map gives shard ``s`` the home ``regions[s % n]``
  (``default_home``). Only nodes of a shard's home region campaign for it while that region
  has a live node.
* **Rank order.** Among the live nodes of the home region, the one with the highest
  rendezvous rank (``node_rank``: a stable hash of shard and node id) campaigns first
  (``preferred_node``), so shards spread evenly and every node agrees who is preferred.
* **Grace before takeover.** Other nodes of the home region campaign only after the shard
  has been unowned for ``grace_s``. When the home region has no live node, nodes of other
  regions campaign: for a failover (the shard was last served in its home region) the best
  ranked of them at once, any other after ``grace_s`` - the successor is chosen before it is
  needed: a dead node's owner keys and node key go in one lease expiry, so nobody of the home
  region can still come back within a grace; for a shard its home region has not served yet
  (a deployment starting) the best ranked after ``grace_s`` and any after ``2 * grace_s``, so
  a region that starts a moment later is not raced for its shards. etcd's compare-and-swap
  makes every race safe; the grace only keeps races rare. (Before, a failover waited one grace
  too: one grace of every failover out of a region, README "Failover at load".)
* **Sticky failover.** A shard won outside its home region, having last been served at home,
  was failed over: its home moves to the winner's region, and the old home is kept as its
  origin, so a flapping region does not drag shards back and forth (``is_failover``).
* **Failback.** An owner outside a shard's home region hands it over once a node of the home
  region has been live for ``grace_s`` (a planned move, or the home region coming back
  before a failover was recorded). ``ledgerctl failback`` moves failed-over shards back to
  their origin (``failback_moves``).
* **Warm successor first.** Meanwhile the home region's node that will campaign first for
  it (the best ranked) warms a standby of the shard (``Action.WARM``: it loads and folds the
  journal, ``ledger.node``) and says so (the adapter's warm key); the owner hands the shard
  over once that node is warm, or after ``warm_wait_s`` at most (``Action.WAIT_WARM``
  until then), so that the takeover replays only the batches appended since instead of the
  whole journal while no node serves the shard. A region just back from a crash loaded
  1,000-1,400 batches in 6-8 s (README, "Heal without stalls"). Only nodes that keep warm
  standbys (``warming_nodes``: their node key says so) are waited for; ``warm_wait_s`` 0
  (the default) hands over at once. A successor whose store is still catching up with the
  other regions (``catching_up_nodes``: Cassandra replaying the hints of what it missed)
  warms nothing until it has, and is waited for up to ``catch_up_wait_s``: a hand-over onto
  it would stall the shard, not just replay more.
* **Failover standby.** For a shard another node serves, the node that would campaign
  first if that owner's node vanished (``failover_successor``: the best ranked of the home
  region's other live nodes, else of all other live nodes) keeps a standby of it that
  follows the journal (``Action.STANDBY``, ``ledger.node``), so that the takeover after a
  crash or a lost lease replays a tail instead of loading the shard cold; nobody waits for
  it. The placement rules above are unchanged: the standby only predicts who wins.
* **Rebalance.** An owner in the home region hands a shard to a better-ranked node of that
  region once that node has been live for ``grace_s``, at most once per
  ``REBALANCE_COOLDOWN_GRACES`` grace periods per shard.
* **Release hold.** A node asked to release a shard leaves it to others for
  ``RELEASE_HOLD_GRACES`` grace periods, then may claim it again (``release_hold_s``).
* **Lease deadline.** A node serves only until its lease *may* have expired at etcd, counted
  from when it sent the last successful keep-alive, minus a safety margin
  (``lease_margin_s``, ``lease_deadline``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from hashlib import blake2b
from typing import Collection, Iterable, Mapping, Sequence

# A shard handed to a better-ranked node of its region is not handed on again for balance
# within this many grace periods, so a sick-but-registered node cannot cause endless churn.
REBALANCE_COOLDOWN_GRACES = 10
# After ``release(shard)`` a node leaves the shard to others for this many grace periods
# (then reclaims it if nobody did, so a drained shard is never left unowned for good).
RELEASE_HOLD_GRACES = 3
# The local lease deadline ends this long before the lease can expire at etcd:
# max(ttl * fraction, minimum). It absorbs clock-rate drift and event loop delays.
SAFETY_MARGIN_FRACTION = 0.2
SAFETY_MARGIN_S_MIN = 0.5
# Keep-alives are sent every ttl * this fraction.
KEEPALIVE_FRACTION = 1 / 3


def node_rank(shard: int, node_id: str) -> int:
    """Rendezvous rank of a node for a shard: stable across processes and versions."""
    digest = blake2b(f"{shard}/{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preferred_node(shard: int, node_ids: Iterable[str]) -> str | None:
    """The node with the best rank for ``shard`` among ``node_ids`` (None if empty).

    Ties of rank (practically impossible with 64-bit ranks) go to the greater node id, so
    every node picks the same one.
    """
    return max(node_ids, key=lambda n: (node_rank(shard, n), n), default=None)


def failover_successor(shard: int, owner: str, home_region: str,
                       live_for_s: Mapping[str, tuple[str, float]]) -> str | None:
    """The node that campaigns first for ``shard`` once its owner's node is gone (its owner
    and node keys share one lease, so they vanish together): the best ranked of the other
    live nodes of the home region, or, if there is none, of every other live node (a
    failover out of the region: the best ranked campaigns at once, ``plan_shard``).
    ``live_for_s`` as for ``plan_shard`` (node id -> (region, seconds live)). None when no
    other node is live."""
    others = [n for n in live_for_s if n != owner]
    home = [n for n in others if live_for_s[n][0] == home_region]
    return preferred_node(shard, home or others)


def default_home(shard: int, regions: Sequence[str]) -> str:
    """The home region a fresh shard map gives ``shard``.

    Raises:
        ZeroDivisionError: ``regions`` is empty (callers check it first).
    """
    return regions[shard % len(regions)]


class Action(enum.Enum):
    """What a node does about one shard after looking at it (``plan_shard``)."""

    NONE = "none"
    CAMPAIGN = "campaign"    # try to win the shard
    RELEASE = "release"      # planned move or failback: shard homed elsewhere and a home node is up
    REBALANCE = "rebalance"  # a better-ranked node of the home region is up and stable
    WAIT_WARM = "wait-warm"  # a release is due: wait (bounded) for the successor's warm standby
    WARM = "warm"            # this node is next in line for a shard moving here: warm a standby
    STANDBY = "standby"      # this node would take the shard over if its owner failed: follow it
    LOST = "lost"            # etcd no longer shows this node's ownership: stop serving
    CLEAN_STALE = "clean"    # an owner key of ours that we do not serve: delete it


@dataclass(slots=True, frozen=True)
class ShardView:
    """What one node knows about one shard at one moment."""

    shard: int
    home_region: str
    owner_node_id: str | None  # None when no owner key exists
    owner_epoch: int
    absent_for_s: float        # how long the owner key has been seen absent (0 if present)
    my_epoch: int              # epoch this node serves the shard with, 0 if it does not
    since_rebalance_s: float   # time since this node last handed the shard on for balance
    held: bool                 # this node was asked to release the shard and holds off
    served_at_home: bool = False  # its last owner seen was of its home region (a failover)
    owner_region: str = ""        # the region of the owner key's node ("" if none or unknown)
    warm_node_id: str | None = None  # the node that announced a warm standby of the shard
    release_due_for_s: float = 0.0   # how long this owner has waited (WAIT_WARM) to release


def plan_shard(view: ShardView, *, me: str, my_region: str,
               live_for_s: Mapping[str, tuple[str, float]], grace_s: float,
               rebalance: bool, warm_wait_s: float = 0.0,
               warming_nodes: Collection[str] = frozenset(),
               catch_up_wait_s: float = 0.0,
               catching_up_nodes: Collection[str] = frozenset(),
               failover_standbys: bool = False) -> Action:
    """Decide what this node does about one shard.

    Args:
        view: The shard as this node sees it.
        me: This node's id.
        my_region: This node's region.
        live_for_s: Every live node (this one included): node id -> (region, seconds it has
            been seen live).
        grace_s: ``takeover_grace_s``.
        rebalance: Whether owners hand shards to better-ranked nodes of the home region.
        warm_wait_s: How long an owner outside the home region waits for its successor's
            warm standby before it hands the shard over anyway; 0: no warm standbys.
        catch_up_wait_s: The wait instead of ``warm_wait_s`` (if longer) when the successor
            is in ``catching_up_nodes``: its store still catches up with the other regions,
            and a hand-over now would stall the shard rather than merely replay more.
        warming_nodes: The live nodes that keep warm standbys (this one included if it
            does); a successor not among them is not waited for.
        failover_standbys: Whether this node follows the shards it would take over if
            their owner failed (``Action.STANDBY``).

    Returns:
        The one action to take now; ``Action.NONE`` when the shard is where it should be or
        someone else should act first.
    """
    home_nodes = [n for n, (region, _) in live_for_s.items() if region == view.home_region]
    stable_home = [n for n in home_nodes if live_for_s[n][1] >= grace_s]
    if view.my_epoch:
        if view.owner_node_id != me or view.owner_epoch != view.my_epoch:
            return Action.LOST
        if my_region != view.home_region:
            # Hand over only to a node that has been up a while, so a flapping home node does
            # not bounce the shard back and forth; and once the node that will campaign first
            # is warm (or after the bounded wait), so its takeover replays only a tail.
            if not stable_home:
                return Action.NONE
            successor = preferred_node(view.shard, home_nodes)
            bound = (max(warm_wait_s, catch_up_wait_s)
                     if warm_wait_s > 0 and successor in catching_up_nodes else warm_wait_s)
            if (successor not in warming_nodes or view.warm_node_id == successor
                    or view.release_due_for_s >= bound):
                return Action.RELEASE
            return Action.WAIT_WARM
        if (rebalance and view.since_rebalance_s >= REBALANCE_COOLDOWN_GRACES * grace_s
                and preferred_node(view.shard, [*stable_home, me]) != me):
            return Action.REBALANCE
        return Action.NONE
    if view.owner_node_id is not None:
        # A key of ours that we do not serve: left by a lost lease, a release whose delete
        # failed, or a campaign whose answer timed out. Delete it and campaign afresh, so the
        # shard is never served under an epoch that was already given up.
        if view.owner_node_id == me:
            return Action.CLEAN_STALE
        if (warm_wait_s > 0 and me in warming_nodes and my_region == view.home_region
                and view.owner_region not in ("", view.home_region)
                and preferred_node(view.shard, home_nodes) == me):
            return Action.WARM  # a move here is due: the owner waits for our warm standby
        if failover_standbys and failover_successor(
                view.shard, view.owner_node_id, view.home_region, live_for_s) == me:
            return Action.STANDBY
        return Action.NONE
    if view.held:
        return Action.NONE
    if my_region == view.home_region:
        if preferred_node(view.shard, home_nodes) == me or view.absent_for_s >= grace_s:
            return Action.CAMPAIGN
        return Action.NONE
    if home_nodes:
        return Action.NONE  # The home region is up; its nodes claim their own shards.
    others = [n for n, (region, _) in live_for_s.items() if region != view.home_region]
    first_s = 0.0 if view.served_at_home else grace_s
    if view.absent_for_s >= first_s + grace_s or (
            view.absent_for_s >= first_s and preferred_node(view.shard, others) == me):
        return Action.CAMPAIGN
    return Action.NONE


def plan(views: Iterable[ShardView], *, me: str, my_region: str,
         live_for_s: Mapping[str, tuple[str, float]], grace_s: float,
         rebalance: bool, warm_wait_s: float = 0.0,
         warming_nodes: Collection[str] = frozenset(),
         catch_up_wait_s: float = 0.0,
         catching_up_nodes: Collection[str] = frozenset(),
         failover_standbys: bool = False) -> dict[Action, list[int]]:
    """``plan_shard`` for many shards: action -> shards, in the order of ``views``.

    Every action is a key of the result (with an empty list if no shard needs it).
    """
    out: dict[Action, list[int]] = {a: [] for a in Action}
    for view in views:
        out[plan_shard(view, me=me, my_region=my_region, live_for_s=live_for_s,
                       grace_s=grace_s, rebalance=rebalance, warm_wait_s=warm_wait_s,
                       warming_nodes=warming_nodes, catch_up_wait_s=catch_up_wait_s,
                       catching_up_nodes=catching_up_nodes,
                       failover_standbys=failover_standbys)].append(view.shard)
    return out


def is_failover(*, home_region: str, my_region: str, served_at_home: bool,
                sticky: bool) -> bool:
    """Whether a shard this node (of ``my_region``) just won was failed over to it.

    A win outside the shard's home region is a failover only if the shard was last served in
    its home region: a region that has simply not started yet gets its shards back when it
    comes up, while a shard taken from a dead region stays (sticky) until an operator moves
    it back. The caller then makes ``my_region`` the home and records ``home_region`` as
    the origin.

    Args:
        home_region: The shard's home as the map says now.
        my_region: The winner's region.
        served_at_home: Whether the last owner seen before the win was of the shard's home
            region (as the map said before the win).
        sticky: Whether failovers are sticky (``False``: shards always go back home).
    """
    return sticky and served_at_home and home_region != my_region


def failover_moves(homes: Mapping[int, str], src: str,
                   to: str) -> tuple[dict[int, str], dict[int, str]]:
    """A planned failover of every shard homed in ``src`` to ``to``.

    Returns:
        (new homes, origins): shard -> ``to`` and shard -> ``src`` for each moved shard; the
        origin lets ``failback_moves`` bring them back.
    """
    moved = {s: to for s, home in sorted(homes.items()) if home == src}
    return moved, {s: src for s in moved}


def failback_moves(origins: Mapping[int, str | None], region: str) -> dict[int, str]:
    """The moves of a failback to ``region``: every shard whose origin is ``region``, home.

    The moved shards' origins are cleared by writing their homes without one.
    """
    return {s: region for s, origin in sorted(origins.items()) if origin == region}


def release_hold_s(grace_s: float) -> float:
    """How long a node leaves a shard it was asked to release to other nodes."""
    return RELEASE_HOLD_GRACES * grace_s


def lease_margin_s(ttl_s: float) -> float:
    """Safety margin between a node's local lease deadline and the expiry at etcd."""
    return max(ttl_s * SAFETY_MARGIN_FRACTION, SAFETY_MARGIN_S_MIN)


def keepalive_period_s(ttl_s: float) -> float:
    """How often a node renews its lease.

    Raises:
        ValueError: the period does not fit before the deadline (TTL too small for its
            margin), so one late keep-alive would already cost the lease.
    """
    period_s = ttl_s * KEEPALIVE_FRACTION
    if period_s >= ttl_s - lease_margin_s(ttl_s):
        raise ValueError("lease_ttl_s too small for its safety margin")
    return period_s


def lease_deadline(*, sent_at: float, ttl_granted_s: float, ttl_s: float) -> float:
    """The local deadline of a lease renewed (or granted) by a request sent at ``sent_at``.

    etcd received the request after it was sent, so its expiry is later than this; the
    smaller of the asked and granted TTL counts, less the safety margin.

    Args:
        sent_at: When the keep-alive or grant request was sent (any monotonic clock).
        ttl_granted_s: The TTL etcd answered with.
        ttl_s: The TTL this node asked for.
    """
    return sent_at + min(ttl_granted_s, ttl_s) - lease_margin_s(ttl_s)
