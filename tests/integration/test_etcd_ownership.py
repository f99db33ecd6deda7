"""EtcdOwnership against a real etcd: election, takeover, loss before expiry, failover, moves.

Proves:
  * two nodes of one region: every shard is owned by exactly one node, by the node the
    rendezvous policy prefers once both are stable, and each node's listener saw exactly the
    shards it owns;
  * ``abandon()`` (a crash: no revoke) hands the node's shards to the other node only after the
    lease TTL, each with a higher epoch;
  * a node whose event loop is blocked past the TTL keeps its lease (keep-alives come from their
    own thread), unless the loop has not run for ``LOOP_STALL_MAX_S``;
  * a node whose keep-alives stop (its link to etcd blackholed) stops serving (suspends) before
    any other node gains one of its shards, and reports their loss once etcd answers that its
    lease is gone (``test_lease_suspension.py``: etcd restarted, the shards serve again);
  * failover across regions: a node of r2 takes r1's shards while r1 has no live node, gives
    them back when an r1 node is up, ``set_home`` moves shards to a node of the target region,
    and a crashed r1 node's shards go to r2 after the TTL;
  * the watch cache (``owner()``, ``placements()``) agrees with what etcd holds.

Uses the session's etcd from ``local_cluster`` (or ``LEDGER_TEST_ETCD_ENDPOINT`` when set, to
run these without Cassandra). Every test uses its own key prefix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import pytest

from shard_router.etcd import EtcdOwnership
from shard_router.local import LocalOwnership
from shard_router.placement import preferred_node

SHARDS = 8
LEASE_TTL_S = 3.0
GRACE_S = 1.0
# Waits that do not involve a lease expiry: watch propagation, a grace period or two.
SETTLE_TIMEOUT_S = 10.0
# Takeover after a crash: the TTL, then the grace periods, then slack for a loaded machine.
TAKEOVER_TIMEOUT_S = LEASE_TTL_S + 2 * GRACE_S + 5.0
POLL_S = 0.05


@dataclass
class Recorder:
    """Every listener call of every node, with monotonic timestamps."""

    events: list[tuple[float, str, int, int]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def listener(self, node_id: str):
        async def on_change(shard: int, epoch: int) -> None:
            self.events.append((time.monotonic(), node_id, shard, epoch))
            self.changed.set()
        return on_change

    def owned(self, node_id: str) -> dict[int, int]:
        """The shards the listener was last told ``node_id`` owns."""
        state: dict[int, int] = {}
        for _, node, shard, epoch in self.events:
            if node == node_id:
                state[shard] = epoch
        return {s: e for s, e in state.items() if e}

    def first(self, node_id: str, shard: int, epoch_is_loss: bool, after: float) -> float | None:
        for at, node, s, epoch in self.events:
            if node == node_id and s == shard and at >= after and (epoch == 0) == epoch_is_loss:
                return at
        return None


async def wait_until(recorder: Recorder, predicate, timeout_s: float, what: str) -> float:
    """Wait for ``predicate()``; wake on listener calls, and every ``POLL_S`` for cache
    changes, which have no event of their own. Returns the seconds waited."""
    started = time.monotonic()
    deadline = started + timeout_s
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        recorder.changed.clear()
        try:
            async with asyncio.timeout(min(remaining, POLL_S)):
                await recorder.changed.wait()
        except TimeoutError:
            pass
    return time.monotonic() - started


async def recorded(recorder: Recorder, node_id: str, shard: int, epoch_is_loss: bool,
                   after: float) -> float:
    """When ``node_id``'s listener was told of the gain (or loss) of ``shard`` after
    ``after``, waiting for that call. A node's ``owned()`` changes first and its listener is
    called from a task after that, so a wait on ``owned()`` can end before the call."""
    await wait_until(recorder, lambda: recorder.first(node_id, shard, epoch_is_loss, after)
                     is not None, SETTLE_TIMEOUT_S,
                     f"{node_id}'s listener to hear of shard {shard}")
    at = recorder.first(node_id, shard, epoch_is_loss, after)
    assert at is not None
    return at


class BlackholeProxy:
    """A TCP proxy to etcd that can be told to drop every byte, in both directions, while
    keeping connections open: the node's calls hang until their deadlines, as on a partition."""

    def __init__(self, target: str) -> None:
        host, _, port = target.split(",")[0].rpartition(":")  # the first of several members
        self._host, self._port = host, int(port)
        self.blackhole = False
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.endpoint = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.endpoint = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.blackhole:
            return  # Accept, never answer.
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers.append(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.blackhole:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()

    async def down(self) -> None:
        """As a member that went down: its connections close, new ones are refused."""
        await self.close()
        self._writers = []
        if self._server is not None:
            await self._server.wait_closed()

    async def up(self) -> None:
        """Listen again on the same port."""
        host, _, port = self.endpoint.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host, int(port))


@pytest.fixture
async def cluster(etcd_endpoint):
    """A factory of nodes under a fresh prefix; closes them all at the end."""
    prefix = f"/test-ownership/{uuid.uuid4().hex[:12]}"
    recorder = Recorder()
    nodes: list[EtcdOwnership] = []
    proxies: list[BlackholeProxy] = []

    async def node(node_id: str, region: str, regions: list[str], *, start: bool = True,
                   endpoint: str | None = None, warmer=None, **options) -> EtcdOwnership:
        n = EtcdOwnership(endpoint or etcd_endpoint, node_id, region, f"{node_id}.test:1",
                          regions, shard_count=SHARDS, lease_ttl_s=LEASE_TTL_S,
                          takeover_grace_s=GRACE_S, prefix=prefix, **options)
        nodes.append(n)
        if warmer is not None:
            n.set_warmer(warmer)
        if start:
            await n.start(recorder.listener(node_id))
        return n

    async def proxy() -> BlackholeProxy:
        p = BlackholeProxy(etcd_endpoint)
        await p.start()
        proxies.append(p)
        return p

    client = _client(etcd_endpoint)
    yield type("Cluster", (), {"node": staticmethod(node), "proxy": staticmethod(proxy),
                               "recorder": recorder, "prefix": prefix, "etcd": client})()
    for n in nodes:
        await n.close()
    for p in proxies:
        await p.close()
    client.delete_prefix(prefix + "/")
    client.close()


def _client(endpoint: str):
    from shard_router.etcd import etcd_client

    return etcd_client(endpoint, 5.0)


def etcd_owners(client, prefix: str) -> dict[int, tuple[str, int]]:
    """shard -> (node_id, epoch) straight from etcd."""
    out = {}
    for value, meta in client.get_prefix(f"{prefix}/owner/"):
        shard = int(meta.key.decode().rsplit("/", 1)[1])
        out[shard] = (json.loads(value)["node_id"], meta.create_revision)
    return out


def etcd_homes(client, prefix: str) -> dict[int, str]:
    out = {}
    for value, meta in client.get_prefix(f"{prefix}/map/"):
        out[int(meta.key.decode().rsplit("/", 1)[1])] = json.loads(value)["home_region"]
    return out


def cache_matches_etcd(node: EtcdOwnership, client, prefix: str) -> bool:
    owners = etcd_owners(client, prefix)
    cached = {s: (o.node_id, o.epoch) for s in range(SHARDS) if (o := node.owner(s))}
    homes = etcd_homes(client, prefix)
    return cached == owners and {p.shard: p.home_region for p in node.placements()} == homes


def all_owned_once(*nodes: EtcdOwnership) -> bool:
    seen: list[int] = []
    for n in nodes:
        seen.extend(n.owned())
    return sorted(seen) == list(range(SHARDS))


def settled(a: EtcdOwnership, b: EtcdOwnership) -> bool:
    """Every shard owned once, by the node of the two the rendezvous policy prefers (no
    rebalance left to come)."""
    ids = [a.node_id, b.node_id]
    return (all_owned_once(a, b)
            and all(s in (a if preferred_node(s, ids) == a.node_id else b).owned()
                    for s in range(SHARDS)))


@pytest.mark.real
async def test_two_nodes_one_region_split_the_shards(cluster):
    a, b = await asyncio.gather(cluster.node("a", "r1", ["r1"]), cluster.node("b", "r1", ["r1"]))
    rec = cluster.recorder
    await wait_until(rec, lambda: settled(a, b), SETTLE_TIMEOUT_S + 2 * GRACE_S,
                     "rendezvous placement")
    assert set(a.owned()).isdisjoint(b.owned())
    assert rec.owned("a") == a.owned() and rec.owned("b") == b.owned()
    for n in (a, b):
        await wait_until(rec, lambda n=n: cache_matches_etcd(n, cluster.etcd, cluster.prefix),
                         SETTLE_TIMEOUT_S, f"{n.node_id}'s cache to match etcd")
    assert {s: e for s, (_, e) in etcd_owners(cluster.etcd, cluster.prefix).items()} == \
        {**a.owned(), **b.owned()}


@pytest.mark.real
async def test_abandoned_node_loses_its_shards_after_the_ttl(cluster):
    a = await cluster.node("a", "r1", ["r1"])
    b = await cluster.node("b", "r1", ["r1"])
    rec = cluster.recorder
    await wait_until(rec, lambda: all_owned_once(a, b) and a.owned() and b.owned(),
                     SETTLE_TIMEOUT_S + 2 * GRACE_S, "both nodes to own shards")
    before = a.owned()
    crashed_at = time.monotonic()
    await a.abandon()
    took_s = await wait_until(rec, lambda: len(b.owned()) == SHARDS, TAKEOVER_TIMEOUT_S,
                              "b to take a's shards")
    print(f"\ntakeover after abandon(): {took_s:.2f}s (lease TTL {LEASE_TTL_S}s)")
    # a crash is noticed only at lease expiry: at least TTL minus one keep-alive period.
    assert took_s >= LEASE_TTL_S * (2 / 3) - 0.1
    for shard, epoch in before.items():
        assert b.owned()[shard] > epoch
        await recorded(rec, "b", shard, epoch_is_loss=False, after=crashed_at)
    await wait_until(rec, lambda: cache_matches_etcd(b, cluster.etcd, cluster.prefix),
                     SETTLE_TIMEOUT_S, "b's cache to match etcd")


@pytest.mark.real
async def test_stalled_keepalives_report_loss_before_anyone_gains(cluster):
    link = await cluster.proxy()
    a = await cluster.node("a", "r1", ["r1"], endpoint=link.endpoint)
    b = await cluster.node("b", "r1", ["r1"])
    rec = cluster.recorder
    # Settled: a shard rebalanced to b after ``before`` is taken would be gained before the cut.
    await wait_until(rec, lambda: settled(a, b), SETTLE_TIMEOUT_S + 2 * GRACE_S,
                     "rendezvous placement")
    before = a.owned()
    # a stops serving at its local deadline: it suspends its shards (it cannot tell a cut
    # link from an etcd outage) and reports their loss once etcd says the lease is gone.
    suspended: list[float] = []
    real_suspend = a._suspend

    def suspend(session, now):
        suspended.append(time.monotonic())
        real_suspend(session, now)

    a._suspend = suspend
    cut_at = time.monotonic()
    link.blackhole = True
    await wait_until(rec, lambda: len(b.owned()) == SHARDS, TAKEOVER_TIMEOUT_S,
                     "b to take the cut-off node's shards")
    assert suspended and not a.lease_valid()
    for shard, epoch in before.items():
        gained = await recorded(rec, "b", shard, epoch_is_loss=False, after=cut_at)
        print(f"\nshard {shard}: a stopped serving it {suspended[0] - cut_at:.2f}s after the "
              f"cut, b gained it {gained - cut_at:.2f}s after (epoch {epoch} -> "
              f"{b.owned()[shard]})")
        assert suspended[0] < gained
        assert b.owned()[shard] > epoch
    healed_at = time.monotonic()
    link.blackhole = False
    await wait_until(rec, lambda: all(rec.first("a", s, True, healed_at) for s in before),
                     SETTLE_TIMEOUT_S, "a to report every loss once etcd answers again")
    assert a.resumptions == 0  # the lease had expired at etcd: nothing served again


@pytest.mark.real
async def test_a_node_whose_event_loop_is_blocked_past_the_ttl_keeps_its_lease(cluster):
    """Keep-alives come from their own thread: a node whose event loop runs nothing for the
    TTL plus a second (a long synchronous step, a loaded machine) keeps its lease, its
    shards and their epochs, reports no loss and is not even suspended; the stall is
    counted. Renewed from the loop, as before, the lease expired and every shard was lost."""
    a = await cluster.node("a", "r1", ["r1"])
    rec = cluster.recorder
    await wait_until(rec, lambda: len(a.owned()) == SHARDS, SETTLE_TIMEOUT_S, "a to own all")
    before = a.owned()
    blocked_at = time.monotonic()
    time.sleep(LEASE_TTL_S + 1.0)  # noqa: ASYNC251 - the point: the event loop is blocked
    assert a.lease_valid(), "the lease lapsed while the loop was blocked"
    # The loop's beat notes the stall once it runs again.
    await wait_until(rec, lambda: a.loop_stalls >= 1, SETTLE_TIMEOUT_S, "the stall noted")
    assert a.longest_loop_stall_s >= LEASE_TTL_S
    assert a.owned() == before and a.suspensions == 0
    assert not [e for e in rec.events if e[0] >= blocked_at and e[3] == 0]
    assert etcd_owners(cluster.etcd, cluster.prefix) == {s: ("a", e) for s, e in before.items()}


@pytest.mark.real
async def test_a_wedged_event_loop_stops_the_keepalives(cluster, monkeypatch):
    """The bound on that: once the loop has not run for ``LOOP_STALL_MAX_S`` (0.5 s here),
    the keep-alive thread stops renewing, so a wedged process loses its shards at the TTL
    (they are won again, with higher epochs, once the loop runs)."""
    from shard_router import etcd as etcd_module

    monkeypatch.setattr(etcd_module, "LOOP_STALL_MAX_S", 0.5)
    a = await cluster.node("a", "r1", ["r1"])
    rec = cluster.recorder
    await wait_until(rec, lambda: len(a.owned()) == SHARDS, SETTLE_TIMEOUT_S, "a to own all")
    before = a.owned()
    blocked_at = time.monotonic()
    # Blocked, as above; etcd checks for expired leases every 0.5 s.
    time.sleep(LEASE_TTL_S + 2.5)  # noqa: ASYNC251
    # etcd expired the lease meanwhile: its owner keys are gone or already won again.
    assert all(etcd_owners(cluster.etcd, cluster.prefix).get(s, ("", 0))[1] != e
               for s, e in before.items())
    await wait_until(rec, lambda: all(a.owned().get(s, 0) > e for s, e in before.items()),
                     TAKEOVER_TIMEOUT_S, "every shard won again under a new lease")
    for s in before:
        await recorded(rec, "a", s, True, blocked_at)


@pytest.mark.real
async def test_failover_across_regions_and_planned_moves(cluster):
    regions = ["r1", "r2"]
    home = {s: regions[s % 2] for s in range(SHARDS)}
    rec = cluster.recorder
    # Only r2 is up: after the grace period it serves r1's shards too. r1 never served
    # them, so this is a cold start, not a failover: nothing is recorded in the map.
    b = await cluster.node("b", "r2", regions)
    await wait_until(rec, lambda: len(b.owned()) == SHARDS, SETTLE_TIMEOUT_S,
                     "b (r2) to take r1's shards while r1 has no node")
    assert all(b.origin(s) is None for s in range(SHARDS))
    cold_epochs = b.owned()
    a = await cluster.node("a", "r1", regions)

    def by_home(a=a) -> bool:
        return (all_owned_once(a, b) and all(s in (a if home[s] == "r1" else b).owned()
                                             for s in range(SHARDS)))

    await wait_until(rec, by_home, SETTLE_TIMEOUT_S, "r1's shards to go to r1 when it starts")
    for shard, epoch in a.owned().items():
        assert epoch > cold_epochs[shard]
    # Planned moves: shard 0 to r2, shard 1 to r1.
    old = {0: a.owned()[0], 1: b.owned()[1]}
    await a.set_homes({0: "r2"})
    await b.set_home(1, "r1")
    home.update({0: "r2", 1: "r1"})
    await wait_until(rec, by_home, SETTLE_TIMEOUT_S, "set_home moves")
    assert a.owner(1).region == "r1" and b.owner(0).region == "r2"
    assert b.owned()[0] > old[0] and a.owned()[1] > old[1]
    # a was told it lost shard 0 before b was told it gained it.
    lost0 = await recorded(rec, "a", 0, epoch_is_loss=True, after=0)
    await recorded(rec, "b", 0, epoch_is_loss=False, after=lost0)
    for n in (a, b):
        await wait_until(rec, lambda n=n: cache_matches_etcd(n, cluster.etcd, cluster.prefix),
                         SETTLE_TIMEOUT_S, f"{n.node_id}'s cache to match etcd")
    assert etcd_homes(cluster.etcd, cluster.prefix) == home
    # r1 crashes: r2 takes r1's shards after the TTL and the grace period - a failover,
    # recorded in the map with r1 as origin.
    r1_epochs = a.owned()
    crashed_at = time.monotonic()
    await a.abandon()
    took_s = await wait_until(rec, lambda: len(b.owned()) == SHARDS, TAKEOVER_TIMEOUT_S,
                              "r2 to take over after r1 crashed")
    print(f"\ncross-region takeover after abandon(): {took_s:.2f}s "
          f"(lease TTL {LEASE_TTL_S}s, grace {GRACE_S}s)")
    assert took_s >= LEASE_TTL_S * (2 / 3) - 0.1
    for shard, epoch in r1_epochs.items():
        assert b.owned()[shard] > epoch
        await recorded(rec, "b", shard, epoch_is_loss=False, after=crashed_at)
    await wait_until(rec, lambda: all(b.origin(s) == "r1" for s in r1_epochs),
                     SETTLE_TIMEOUT_S, "the failover to be recorded in the map")
    # r1 comes back: its shards stay in r2 (no flapping) until the operator fails back.
    a2 = await cluster.node("a2", "r1", regions)
    await wait_until(rec, lambda: all_owned_once(a2, b) and len(b.owned()) == SHARDS,
                     SETTLE_TIMEOUT_S, "r2 to keep every shard while r1 rejoins")
    assert not a2.owned()
    failback = {s: b.origin(s) for s in range(SHARDS) if b.origin(s)}
    assert failback == {s: "r1" for s in r1_epochs}
    await a2.set_homes(failback)
    home.update(failback)
    await wait_until(rec, lambda: by_home(a2), SETTLE_TIMEOUT_S, "failback to r1 on command")
    assert all(a2.origin(s) is None for s in range(SHARDS))
    await wait_until(rec, lambda: cache_matches_etcd(b, cluster.etcd, cluster.prefix),
                     SETTLE_TIMEOUT_S, "b's cache to match etcd")


def etcd_warm_keys(client, prefix: str) -> dict[int, str]:
    return {int(meta.key.decode().rsplit("/", 1)[1]): json.loads(value)["node_id"]
            for value, meta in client.get_prefix(f"{prefix}/warm/")}


@pytest.mark.real
async def test_a_planned_move_waits_for_the_successors_warm_standby(cluster):
    """r1's shards, served in r2 (r1 started later), go home to r1's node only once it says
    it holds warm standbys of them (``ledger.node``, "warm standbys"), or after
    ``warm_wait_s``; a node that keeps none is not waited for (the test above)."""
    regions = ["r1", "r2"]
    rec = cluster.recorder
    r1_shards = {s for s in range(SHARDS) if s % 2 == 0}
    b = await cluster.node("b", "r2", regions, warm_wait_s=60.0)
    await wait_until(rec, lambda: len(b.owned()) == SHARDS, SETTLE_TIMEOUT_S,
                     "b (r2) to take r1's shards while r1 has no node")
    asked: list[set[int]] = []
    ready: set[int] = set()

    def warmer(shards: set[int], keep: set[int]) -> set[int]:
        asked.append(set(shards))
        return ready & shards

    # (Failover standbys off: a would also be asked to follow b's own shards, the test below.)
    a = await cluster.node("a", "r1", regions, warmer=warmer, failover_standbys=False)
    # a is live and stable, asked to warm exactly r1's shards; b holds them meanwhile.
    await wait_until(rec, lambda: bool(asked) and asked[-1] == r1_shards, SETTLE_TIMEOUT_S,
                     "a to be asked for standbys of r1's shards")
    await asyncio.sleep(3 * GRACE_S)
    assert len(b.owned()) == SHARDS and not a.owned()
    assert etcd_warm_keys(cluster.etcd, cluster.prefix) == {}
    # Warm: a says so (its warm keys), b lets go, a takes them.
    ready.update(r1_shards)
    await wait_until(rec, lambda: set(a.owned()) == r1_shards, SETTLE_TIMEOUT_S,
                     "r1's shards to move once a is warm")
    assert set(b.owned()) == set(range(SHARDS)) - r1_shards
    # Moved: nothing left to warm, the warm keys are withdrawn.
    await wait_until(rec, lambda: not etcd_warm_keys(cluster.etcd, cluster.prefix)
                     and asked[-1] == set(), SETTLE_TIMEOUT_S, "the warm keys to go")


@pytest.mark.real
async def test_each_node_follows_the_shards_it_would_take_over_if_their_owner_died(cluster):
    """Failover standbys (``placement``, "Failover standby"; on by default for a node with a
    warmer): each node is asked to keep standbys of exactly the shards it would win if
    their owner's node died, none of them is announced (nobody waits for them), and when the
    owner dies, those are the shards the node wins."""
    regions = ["r1", "r2"]
    rec = cluster.recorder
    asked: dict[str, set[int]] = {}

    def warmer_of(name: str):
        def warmer(shards: set[int], keep: set[int]) -> set[int]:
            asked[name] = set(shards)
            return set(shards)  # ready at once
        return warmer

    a = await cluster.node("a", "r1", regions, warmer=warmer_of("a"))
    b = await cluster.node("b", "r2", regions, warmer=warmer_of("b"))
    await wait_until(rec, lambda: all_owned_once(a, b) and len(a.owned()) == SHARDS // 2
                     and len(b.owned()) == SHARDS // 2, SETTLE_TIMEOUT_S,
                     "each region's node to serve its own shards")
    await wait_until(rec, lambda: asked.get("a") == set(b.owned())
                     and asked.get("b") == set(a.owned()), SETTLE_TIMEOUT_S,
                     "each node to be asked to follow the other's shards")
    assert etcd_warm_keys(cluster.etcd, cluster.prefix) == {}
    followed = asked["a"]
    await b.abandon()
    await wait_until(rec, lambda: len(a.owned()) == SHARDS, TAKEOVER_TIMEOUT_S,
                     "a to take over b's shards")
    for shard in followed:
        await recorded(rec, "a", shard, epoch_is_loss=False, after=0)
    await wait_until(rec, lambda: asked.get("a") == set(), SETTLE_TIMEOUT_S,
                     "a, alone, to follow nothing")


@pytest.mark.real
async def test_a_planned_move_waits_for_a_warm_standby_no_longer_than_its_bound(cluster):
    regions = ["r1", "r2"]
    rec = cluster.recorder
    b = await cluster.node("b", "r2", regions, warm_wait_s=2.0)
    await wait_until(rec, lambda: len(b.owned()) == SHARDS, SETTLE_TIMEOUT_S,
                     "b (r2) to take r1's shards while r1 has no node")
    a = await cluster.node("a", "r1", regions, warmer=lambda shards, keep: set())  # never warm
    started = time.monotonic()
    await wait_until(rec, lambda: len(a.owned()) == SHARDS // 2, SETTLE_TIMEOUT_S,
                     "r1's shards to move after the bound")
    # The grace (a stable for GRACE_S) plus the bound, at least.
    assert time.monotonic() - started >= GRACE_S + 2.0 - 0.2


@pytest.mark.real
async def test_a_planned_move_waits_longer_for_a_successor_whose_store_is_catching_up(cluster):
    """A successor whose store is still catching up with the other regions (its node key
    says so: ``set_catching_up``) is waited for past ``warm_wait_s``, up to
    ``catch_up_wait_s``: a hand-over onto it stalled the shard (kill-region drill). Once it
    has caught up, it gets the whole ``warm_wait_s`` from then on to warm up (the shards
    went to it cold 2 s after it caught up, before)."""
    regions = ["r1", "r2"]
    rec = cluster.recorder
    r1_shards = {s for s in range(SHARDS) if s % 2 == 0}
    warm_wait_s = 2.0
    b = await cluster.node("b", "r2", regions, warm_wait_s=warm_wait_s, catch_up_wait_s=120.0)
    await wait_until(rec, lambda: len(b.owned()) == SHARDS, SETTLE_TIMEOUT_S,
                     "b (r2) to take r1's shards while r1 has no node")
    ready: set[int] = set()
    a = await cluster.node("a", "r1", regions, warmer=lambda shards, keep: ready & shards,
                           start=False)
    await a.set_catching_up(True)  # before it joins: its first node key says so
    await a.start(rec.listener("a"))
    await wait_until(rec, lambda: b.catching_up_nodes() == ["a"], SETTLE_TIMEOUT_S,
                     "b to see that a's store is catching up")
    await asyncio.sleep(3 * GRACE_S + warm_wait_s)  # the grace and the warm bound, passed
    assert len(b.owned()) == SHARDS and not a.owned()
    # Caught up, not warm yet: the warm bound starts again now.
    await a.set_catching_up(False)
    await wait_until(rec, lambda: b.catching_up_nodes() == [], SETTLE_TIMEOUT_S,
                     "b to see that a has caught up")
    await asyncio.sleep(warm_wait_s / 2)
    assert len(b.owned()) == SHARDS and not a.owned()
    ready.update(r1_shards)  # warm: a says so, b lets go, a takes them
    await wait_until(rec, lambda: set(a.owned()) == r1_shards, SETTLE_TIMEOUT_S,
                     "r1's shards to move once a is warm")


@pytest.mark.real
async def test_release_hands_a_shard_to_the_other_node(cluster):
    a = await cluster.node("a", "r1", ["r1"])
    b = await cluster.node("b", "r1", ["r1"])
    rec = cluster.recorder
    await wait_until(rec, lambda: all_owned_once(a, b) and a.owned() and b.owned(),
                     SETTLE_TIMEOUT_S + 2 * GRACE_S, "both nodes to own shards")
    shard, epoch = next(iter(a.owned().items()))
    await a.release(shard)
    assert shard not in a.owned()
    await wait_until(rec, lambda: shard in b.owned(), SETTLE_TIMEOUT_S, "b to take it")
    assert b.owned()[shard] > epoch


async def test_local_ownership_owns_everything_until_closed():
    calls: list[tuple[int, int]] = []

    async def listener(shard: int, epoch: int) -> None:
        calls.append((shard, epoch))

    own = LocalOwnership(4, epoch=7)
    assert own.owner(0) is None
    await own.start(listener)
    assert calls == [(s, 7) for s in range(4)]
    assert own.owner(3).epoch == 7 and own.owner(3).node_id == "dev"
    assert [p.home_region for p in own.placements()] == ["dev"] * 4
    await own.close()
    await own.close()
    assert calls[4:] == [(s, 0) for s in range(4)]
    assert own.owner(0) is None


@pytest.mark.real
async def test_a_failed_loop_is_logged_and_restarted(cluster, caplog):
    """A bug in the reconcile loop does not stop campaigns: it is logged, the loop restarts,
    and a released shard is still won back after its hold."""
    a = await cluster.node("a", "r1", ["r1"])
    rec = cluster.recorder
    await wait_until(rec, lambda: len(a.owned()) == SHARDS, SETTLE_TIMEOUT_S, "a to own all")
    real_reconcile = a._reconcile_once
    failures = []

    async def broken_once() -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("injected reconcile bug")
        await real_reconcile()

    a._reconcile_once = broken_once
    shard, epoch = next(iter(a.owned().items()))
    with caplog.at_level(logging.ERROR, logger="shard_router.etcd"):
        await a.release(shard)
        await wait_until(rec, lambda: a.owned().get(shard, 0) > epoch,
                         SETTLE_TIMEOUT_S + 3 * GRACE_S, "the released shard to come back")
    assert failures
    assert any("etcd reconcile loop failed" in r.getMessage() for r in caplog.records)


@pytest.mark.real
async def test_a_failed_keepalive_loop_gives_up_the_shards_and_wins_them_back(cluster, caplog):
    """A bug in a loop that guards the lease: every shard is reported lost at once (the lease
    was unwatched), then won again under a new lease with higher epochs."""
    a = await cluster.node("a", "r1", ["r1"])
    rec = cluster.recorder
    await wait_until(rec, lambda: len(a.owned()) == SHARDS, SETTLE_TIMEOUT_S, "a to own all")
    before = a.owned()
    real_refresh = a._refresh
    failures = []

    def broken_once(lease_id: int):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected keep-alive bug")
        return real_refresh(lease_id)

    a._refresh = broken_once
    with caplog.at_level(logging.ERROR, logger="shard_router.etcd"):
        await wait_until(rec, lambda: all(a.owned().get(s, 0) > e for s, e in before.items()),
                         TAKEOVER_TIMEOUT_S, "every shard to be won again")
    for s in before:
        await recorded(rec, "a", s, True, 0.0)
    assert any("etcd keepalive loop failed" in r.getMessage() for r in caplog.records)


async def test_a_node_given_every_etcd_endpoint_keeps_its_shards_while_each_goes_down(cluster):
    """``--etcd`` lists every member (one per region): when the endpoint a node's calls use
    goes down (here a proxy to the session's etcd that closes its connections and refuses new
    ones, as a dead member's port does), its keep-alives, reads and watch move to another.
    Each of three endpoints down in turn for two lease TTLs, the others up: the node never
    loses a shard, and its cache still agrees with etcd."""
    proxies = [await cluster.proxy() for _ in range(3)]
    node = await cluster.node("multi", "r1", ["r1"],
                              endpoint=",".join(p.endpoint for p in proxies))
    recorder = cluster.recorder
    await wait_until(recorder, lambda: len(recorder.owned("multi")) == SHARDS,
                     SETTLE_TIMEOUT_S, "the node to own every shard")
    for proxy in proxies:
        await proxy.down()
        # An observation window, not a synchronization: no loss may happen during it.
        await asyncio.sleep(2 * LEASE_TTL_S)
        losses = [e for e in recorder.events if e[1] == "multi" and e[3] == 0]
        assert not losses, f"lost shards with {proxy.endpoint} down: {losses}"
        await proxy.up()
    assert len(recorder.owned("multi")) == SHARDS
    await wait_until(recorder, lambda: cache_matches_etcd(node, cluster.etcd, cluster.prefix),
                     SETTLE_TIMEOUT_S, "the node's cache to agree with etcd")
