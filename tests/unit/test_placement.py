"""The shard placement policy (``shard_router.placement``), rule by rule, without etcd.

Proves: home region first; rank order (the preferred node campaigns at once, others wait);
grace before takeover (backups of the home region after one grace, other regions only when
the home region has no live node: after a failover the best ranked at once and any after one
grace, for a region not started yet the best ranked after one grace and any after two); sticky
failover; failback (an owner outside the home hands over only to a stable home node, and
``failback_moves`` returns failed-over shards to their origin); rebalance (to a better-ranked
stable node, at most once per cooldown); losses, stale keys and release holds; the lease
deadline arithmetic.
"""

from __future__ import annotations

import math

import pytest

from shard_router.placement import (REBALANCE_COOLDOWN_GRACES, RELEASE_HOLD_GRACES, Action,
                                    ShardView, default_home, failback_moves, failover_moves,
                                    failover_successor,
                                    is_failover, keepalive_period_s, lease_deadline,
                                    lease_margin_s, node_rank, plan, plan_shard,
                                    preferred_node, release_hold_s)

GRACE_S = 1.0
SHARD = 7


def view(**fields) -> ShardView:
    """An unowned shard homed in r1 that nobody served yet; ``fields`` override."""
    base = dict(shard=SHARD, home_region="r1", owner_node_id=None, owner_epoch=0,
                absent_for_s=0.0, my_epoch=0, since_rebalance_s=math.inf, held=False)
    base.update(fields)
    return ShardView(**base)


def decide(v: ShardView, me: str, live: dict[str, tuple[str, float]], *,
           rebalance: bool = True) -> Action:
    return plan_shard(v, me=me, my_region=live[me][0], live_for_s=live, grace_s=GRACE_S,
                      rebalance=rebalance)


def ranked(shard: int, nodes: list[str]) -> list[str]:
    """``nodes`` best rank first, by the policy's own order."""
    order: list[str] = []
    rest = list(nodes)
    while rest:
        best = preferred_node(shard, rest)
        order.append(best)
        rest.remove(best)
    return order


# --- home region first, rank order ----------------------------------------------------------


def test_default_home_spreads_shards_over_regions_in_turn():
    regions = ["r1", "r2", "r3"]
    assert [default_home(s, regions) for s in range(7)] == [
        "r1", "r2", "r3", "r1", "r2", "r3", "r1"]


def test_rank_is_stable_and_the_preferred_node_has_the_best_rank():
    # Pinned: the rank is a BLAKE2b digest, the same in every process and version.
    assert node_rank(0, "a") == node_rank(0, "a")
    assert node_rank(0, "a") != node_rank(1, "a")
    nodes = ["a", "b", "c", "d"]
    best = preferred_node(SHARD, nodes)
    assert node_rank(SHARD, best) == max(node_rank(SHARD, n) for n in nodes)
    assert preferred_node(SHARD, reversed(nodes)) == best
    assert preferred_node(SHARD, []) is None


def test_ranks_spread_shards_over_nodes():
    counts = {n: 0 for n in "abcd"}
    for shard in range(256):
        counts[preferred_node(shard, counts)] += 1
    assert all(40 <= c <= 90 for c in counts.values()), counts


def test_only_the_preferred_home_node_campaigns_at_once():
    live = {"a": ("r1", 10.0), "b": ("r1", 10.0), "x": ("r2", 10.0)}
    first, second = ranked(SHARD, ["a", "b"])
    assert decide(view(), first, live) is Action.CAMPAIGN
    assert decide(view(), second, live) is Action.NONE
    # Another region's node never campaigns while the home region has a live node, however
    # long the shard has been unowned.
    assert decide(view(absent_for_s=100 * GRACE_S), "x", live) is Action.NONE


# --- grace before takeover ------------------------------------------------------------------


def test_a_backup_of_the_home_region_campaigns_after_one_grace():
    live = {"a": ("r1", 10.0), "b": ("r1", 10.0)}
    _, second = ranked(SHARD, ["a", "b"])
    assert decide(view(absent_for_s=GRACE_S * 0.99), second, live) is Action.NONE
    assert decide(view(absent_for_s=GRACE_S), second, live) is Action.CAMPAIGN


def test_other_regions_take_over_at_once_when_the_home_region_dies():
    live = {"x": ("r2", 10.0), "y": ("r3", 10.0)}
    first, second = ranked(SHARD, ["x", "y"])
    # A failover (last served at home): the best ranked of the other regions at once (a
    # failover out of a region costs the lease, not the lease and a grace), any after one.
    dead = dict(served_at_home=True)
    assert decide(view(absent_for_s=0.0, **dead), first, live) is Action.CAMPAIGN
    assert decide(view(absent_for_s=GRACE_S * 0.99, **dead), second, live) is Action.NONE
    assert decide(view(absent_for_s=GRACE_S, **dead), second, live) is Action.CAMPAIGN


def test_other_regions_wait_for_a_home_region_that_has_not_started():
    live = {"x": ("r2", 10.0), "y": ("r3", 10.0)}
    first, second = ranked(SHARD, ["x", "y"])
    for me in (first, second):
        assert decide(view(absent_for_s=GRACE_S * 0.99), me, live) is Action.NONE
    # Never served at home: the best ranked after one grace, any after two.
    assert decide(view(absent_for_s=GRACE_S), first, live) is Action.CAMPAIGN
    assert decide(view(absent_for_s=GRACE_S), second, live) is Action.NONE
    assert decide(view(absent_for_s=2 * GRACE_S), second, live) is Action.CAMPAIGN


def test_an_owned_shard_is_left_alone_by_everyone_else():
    live = {"a": ("r1", 10.0), "b": ("r1", 10.0), "x": ("r2", 10.0)}
    owned = view(owner_node_id="a", owner_epoch=5)
    for me in ("b", "x"):
        assert decide(owned, me, live) is Action.NONE


# --- sticky failover and failback -----------------------------------------------------------


def test_a_win_outside_home_is_a_failover_only_if_it_was_served_at_home():
    assert is_failover(home_region="r1", my_region="r2", served_at_home=True, sticky=True)
    # A region that has not started yet gets its shards back when it comes up.
    assert not is_failover(home_region="r1", my_region="r2", served_at_home=False,
                           sticky=True)
    assert not is_failover(home_region="r1", my_region="r1", served_at_home=True,
                           sticky=True)
    assert not is_failover(home_region="r1", my_region="r2", served_at_home=True,
                           sticky=False)


def test_an_owner_outside_home_hands_over_only_to_a_stable_home_node():
    me = "x"
    mine = view(owner_node_id=me, owner_epoch=9, my_epoch=9)
    assert decide(mine, me, {me: ("r2", 10.0)}) is Action.NONE
    flapping = {me: ("r2", 10.0), "a": ("r1", GRACE_S * 0.5)}
    assert decide(mine, me, flapping) is Action.NONE
    stable = {me: ("r2", 10.0), "a": ("r1", GRACE_S)}
    assert decide(mine, me, stable) is Action.RELEASE


WARM_WAIT_S = 20.0


def test_an_owner_outside_home_waits_for_its_successors_warm_standby():
    """A planned hand-over waits (bounded) until the node that will campaign first holds a
    warm standby, so its takeover replays only a tail (README "Heal without stalls")."""
    me = "x"
    first, second = ranked(SHARD, ["a", "b"])
    live = {me: ("r2", 10.0), first: ("r1", GRACE_S), second: ("r1", GRACE_S)}

    def owner_decides(warming: frozenset = frozenset({first, second}), **fields) -> Action:
        v = view(owner_node_id=me, owner_epoch=9, my_epoch=9, owner_region="r2", **fields)
        return plan_shard(v, me=me, my_region="r2", live_for_s=live, grace_s=GRACE_S,
                          rebalance=True, warm_wait_s=WARM_WAIT_S, warming_nodes=warming)

    assert owner_decides() is Action.WAIT_WARM
    assert owner_decides(warm_node_id=second) is Action.WAIT_WARM  # not the one campaigning
    assert owner_decides(warm_node_id=first) is Action.RELEASE
    assert owner_decides(release_due_for_s=WARM_WAIT_S * 0.9) is Action.WAIT_WARM
    assert owner_decides(release_due_for_s=WARM_WAIT_S) is Action.RELEASE  # waited enough
    # A successor that keeps no warm standbys (its node key says so) is not waited for.
    assert owner_decides(warming={second}) is Action.RELEASE
    # Without warm standbys (warm_wait_s 0) the hand-over is immediate, as before.
    assert decide(view(owner_node_id=me, owner_epoch=9, my_epoch=9), me, live) is (
        Action.RELEASE)


def test_an_owner_waits_longer_for_a_successor_whose_store_is_catching_up():
    """A successor whose store still replays what it missed (its node key: catching_up) is
    waited for up to catch_up_wait_s, not warm_wait_s: handing over then stalled the shard
    (README "Heal without stalls")."""
    me = "x"
    first, second = ranked(SHARD, ["a", "b"])
    live = {me: ("r2", 10.0), first: ("r1", GRACE_S), second: ("r1", GRACE_S)}
    catch_up_s = WARM_WAIT_S * 4

    def owner_decides(behind: frozenset, waited_s: float, warm_node_id=None,
                      warm_wait_s: float = WARM_WAIT_S) -> Action:
        v = view(owner_node_id=me, owner_epoch=9, my_epoch=9, owner_region="r2",
                 release_due_for_s=waited_s, warm_node_id=warm_node_id)
        return plan_shard(v, me=me, my_region="r2", live_for_s=live, grace_s=GRACE_S,
                          rebalance=True, warm_wait_s=warm_wait_s,
                          warming_nodes=frozenset({first, second}),
                          catch_up_wait_s=catch_up_s, catching_up_nodes=behind)

    assert owner_decides(frozenset({first}), WARM_WAIT_S) is Action.WAIT_WARM
    assert owner_decides(frozenset({first}), catch_up_s * 0.9) is Action.WAIT_WARM
    assert owner_decides(frozenset({first}), catch_up_s) is Action.RELEASE  # bounded
    # Only the successor's own state counts; a warm successor is handed the shard at once.
    assert owner_decides(frozenset({second}), WARM_WAIT_S) is Action.RELEASE
    assert owner_decides(frozenset({first}), 0.0, warm_node_id=first) is Action.RELEASE
    # Without warm standbys nothing waits, catching up or not.
    assert owner_decides(frozenset({first}), 0.0, warm_wait_s=0.0) is Action.RELEASE


def test_the_successor_of_a_shard_moving_to_its_region_warms_a_standby():
    first, second = ranked(SHARD, ["a", "b"])
    live = {"x": ("r2", 10.0), first: ("r1", 0.1), second: ("r1", GRACE_S)}
    held_elsewhere = view(owner_node_id="x", owner_epoch=9, owner_region="r2")

    def decides(me: str, v: ShardView, wait_s: float = WARM_WAIT_S,
                warming: frozenset = frozenset(live)) -> Action:
        return plan_shard(v, me=me, my_region=live[me][0], live_for_s=live, grace_s=GRACE_S,
                          rebalance=True, warm_wait_s=wait_s, warming_nodes=warming)

    # Only the node that will campaign first (stable or not yet), and only when warm
    # standbys are on.
    assert decides(first, held_elsewhere) is Action.WARM
    assert decides(second, held_elsewhere) is Action.NONE
    assert decides(first, held_elsewhere, 0.0) is Action.NONE
    assert decides(first, held_elsewhere, warming=frozenset({second})) is Action.NONE
    # Not for a shard served in its home region (a rebalance is not waited for) or unowned.
    assert decides(first, view(owner_node_id=second, owner_epoch=9,
                                owner_region="r1")) is Action.NONE
    assert decides(first, view()) is Action.CAMPAIGN


@pytest.mark.parametrize("owner_region, nodes", [
    ("r1", {"o": "r1", "a": "r1", "b": "r1", "x": "r2", "y": "r3"}),  # backups at home
    ("r1", {"o": "r1", "x": "r2", "y": "r3", "z": "r2"}),            # the home region's only node
    ("r2", {"o": "r2", "x": "r2", "y": "r3"}),                       # failed over, r1 still dead
])
def test_the_failover_standby_is_the_node_that_campaigns_first_when_the_owner_dies(
        owner_region, nodes):
    """``Action.STANDBY`` goes to exactly one node per owned shard (its failover successor),
    and once the owner's node is gone from the live set (its keys went with its lease), that
    node is the one that campaigns at once: the standby predicts the winner."""
    live = {n: (region, 10.0) for n, region in nodes.items()}
    owned = view(owner_node_id="o", owner_epoch=5, owner_region=owner_region)
    standby = [me for me in nodes if me != "o" and plan_shard(
        owned, me=me, my_region=nodes[me], live_for_s=live, grace_s=GRACE_S, rebalance=True,
        failover_standbys=True) is Action.STANDBY]
    assert standby == [failover_successor(SHARD, "o", "r1", live)]
    # Off by default: nobody follows.
    assert all(decide(owned, me, live) is Action.NONE for me in nodes if me != "o")
    # The owner dies: the successor campaigns at once (a failover, last served at home, or a
    # backup of the home region), nobody else does yet.
    del live["o"]
    gone = view(absent_for_s=0.0, served_at_home=owner_region == "r1")
    if owner_region != "r1":
        gone = view(absent_for_s=GRACE_S, served_at_home=False)  # after its one grace
    first = [me for me in live if decide(gone, me, live) is Action.CAMPAIGN]
    assert first == standby


def test_no_standby_without_another_live_node():
    assert failover_successor(SHARD, "o", "r1", {"o": ("r1", 10.0)}) is None


def test_failover_and_failback_moves():
    homes = {0: "r1", 1: "r2", 2: "r1", 3: "r3"}
    moved, origins = failover_moves(homes, "r1", "r2")
    assert moved == {0: "r2", 2: "r2"} and origins == {0: "r1", 2: "r1"}
    assert failback_moves({0: "r1", 1: None, 2: "r1", 3: "r2"}, "r1") == {0: "r1", 2: "r1"}
    assert failback_moves({0: None}, "r1") == {}


# --- rebalance ------------------------------------------------------------------------------


def test_an_owner_hands_a_shard_to_a_better_ranked_stable_home_node():
    worse, better = ranked(SHARD, ["a", "b"])[::-1]
    mine = view(owner_node_id=worse, owner_epoch=3, my_epoch=3)
    stable = {worse: ("r1", 10.0), better: ("r1", GRACE_S)}
    assert decide(mine, worse, stable) is Action.REBALANCE
    assert decide(mine, worse, stable, rebalance=False) is Action.NONE
    young = {worse: ("r1", 10.0), better: ("r1", GRACE_S * 0.5)}
    assert decide(mine, worse, young) is Action.NONE
    # The best ranked owner keeps its shard.
    theirs = view(owner_node_id=better, owner_epoch=3, my_epoch=3)
    assert decide(theirs, better, stable) is Action.NONE


def test_rebalance_waits_out_its_cooldown():
    worse, better = ranked(SHARD, ["a", "b"])[::-1]
    stable = {worse: ("r1", 10.0), better: ("r1", 10.0)}
    cooldown_s = REBALANCE_COOLDOWN_GRACES * GRACE_S
    recent = view(owner_node_id=worse, owner_epoch=3, my_epoch=3,
                  since_rebalance_s=cooldown_s * 0.99)
    assert decide(recent, worse, stable) is Action.NONE
    due = view(owner_node_id=worse, owner_epoch=3, my_epoch=3, since_rebalance_s=cooldown_s)
    assert decide(due, worse, stable) is Action.REBALANCE


# --- losses, stale keys, holds --------------------------------------------------------------


def test_a_changed_owner_key_is_a_loss():
    live = {"a": ("r1", 10.0), "b": ("r1", 10.0)}
    assert decide(view(owner_node_id="b", owner_epoch=8, my_epoch=5), "a", live) is Action.LOST
    assert decide(view(owner_node_id="a", owner_epoch=8, my_epoch=5), "a", live) is Action.LOST
    assert decide(view(owner_node_id=None, my_epoch=5), "a", live) is Action.LOST


def test_a_key_of_ours_that_we_do_not_serve_is_cleaned():
    live = {"a": ("r1", 10.0)}
    assert decide(view(owner_node_id="a", owner_epoch=4), "a", live) is Action.CLEAN_STALE


def test_a_released_shard_is_left_to_others_while_held():
    live = {"a": ("r1", 10.0)}
    assert decide(view(held=True, absent_for_s=100.0), "a", live) is Action.NONE
    assert decide(view(held=False), "a", live) is Action.CAMPAIGN
    assert release_hold_s(GRACE_S) == RELEASE_HOLD_GRACES * GRACE_S


def test_plan_groups_shards_by_action():
    live = {"a": ("r1", 10.0)}
    views = [view(shard=0), view(shard=1, owner_node_id="a", owner_epoch=2),
             view(shard=2, owner_node_id="a", owner_epoch=3, my_epoch=3)]
    out = plan(views, me="a", my_region="r1", live_for_s=live, grace_s=GRACE_S,
               rebalance=True)
    assert out[Action.CAMPAIGN] == [0]
    assert out[Action.CLEAN_STALE] == [1]
    assert out[Action.NONE] == [2]
    assert set(out) == set(Action)


# --- the lease deadline ---------------------------------------------------------------------


def test_the_lease_deadline_counts_from_the_send_time_less_a_margin():
    assert lease_margin_s(3.0) == pytest.approx(0.6)
    assert lease_margin_s(1.0) == 0.5  # the minimum
    assert lease_deadline(sent_at=100.0, ttl_granted_s=3.0, ttl_s=3.0) == pytest.approx(102.4)
    # etcd may grant more than asked (it rounds up): the smaller counts.
    assert lease_deadline(sent_at=100.0, ttl_granted_s=5.0, ttl_s=3.0) == pytest.approx(102.4)
    assert lease_deadline(sent_at=100.0, ttl_granted_s=2.0, ttl_s=3.0) == pytest.approx(101.4)


def test_keepalives_fit_before_the_deadline():
    assert keepalive_period_s(3.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="too small"):
        keepalive_period_s(0.6)
