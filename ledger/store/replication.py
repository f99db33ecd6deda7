"""Does a keyspace's replication keep RPO = 0 when a whole region (datacenter) is lost?

Pure functions, no I/O: ``CassandraStore.connect`` feeds them what the cluster says (the
keyspace's replication from ``system_schema.keyspaces``, the datacenters of the nodes), and
``ledgerctl replication`` prints their verdict.

The rule. A journal append is a lightweight transaction whose Paxos rounds need a quorum of
ALL the keyspace's replicas at SERIAL: with N replicas in total, Q = N // 2 + 1 of them. An
acknowledged batch survives the loss of any one datacenter, and appends go on without it,
exactly when, for every datacenter D, the replicas outside D still form a quorum
(N - replicas(D) >= Q). That also means no datacenter holds a quorum by itself (replicas(D)
<= N - Q < Q), so every acknowledgement includes replicas in at least two datacenters. Both
reasons are reported separately, because they fail differently: a datacenter holding a quorum
can acknowledge a batch that exists nowhere else (losing it loses the batch, RPO > 0); a
datacenter whose loss leaves less than a quorum stops every append (the ledger stops).

Examples: ``{r1: 1, r2: 1, r3: 1}`` (N 3, Q 2) survives; ``{r1: 2, r2: 2, r3: 1}`` (N 5, Q 3)
survives; ``{r1: 3, r2: 1, r3: 1}`` (N 5, Q 3) does not: r1 holds a quorum alone;
``{r1: 1, r2: 1}`` does not: losing either leaves 1 of the 2 needed; ``{r1: 1}`` does not.

LOCAL_SERIAL needs a quorum of the local datacenter only, so nothing it acknowledges is known
to be in a second region: it never survives a region loss (``ledgerd node --durability
local`` chooses that knowingly). The commit consistency (the Paxos commit phase and the row
writes) must be QUORUM: EACH_QUORUM and ALL stop when a region is gone; LOCAL_* or ONE-like
levels make a batch visible to the QUORUM reads of a new owner only after a Paxos round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ledger.store.port import StoreError

NETWORK_TOPOLOGY = "NetworkTopologyStrategy"


class UnsafeReplication(StoreError):
    """The keyspace's replication cannot keep acknowledged batches through a region loss.

    Raised by ``CassandraStore.connect`` in the durable mode; the message says why and how to
    fix it. Not a transient error: retrying does not help, the keyspace must be altered.
    """


@dataclass(frozen=True)
class ReplicationVerdict:
    """Whether a commit survives the loss of any one datacenter, and why not."""

    replication: dict[str, int]
    total: int          # N: replicas over all datacenters
    quorum: int         # Q: replicas a SERIAL / QUORUM round needs
    survives_region_loss: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """One operator-readable line (or paragraph) for logs and ``ledgerctl``."""
        repl = format_replication(self.replication)
        if self.survives_region_loss:
            return (f"replication {repl}: {self.total} replicas, quorum {self.quorum}; an "
                    f"acknowledged commit is in at least two datacenters and survives the "
                    f"loss of any one")
        return (f"replication {repl} does not survive the loss of a region: "
                + "; ".join(self.reasons))

    def as_dict(self) -> dict:
        return {"replication": dict(self.replication), "replicas": self.total,
                "quorum": self.quorum, "survives_region_loss": self.survives_region_loss,
                "reasons": list(self.reasons)}


def format_replication(replication: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{dc}: {n}" for dc, n in sorted(replication.items())) + "}"


def parse_replication(options: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    """Split a ``system_schema.keyspaces.replication`` map into (strategy, dc -> replicas).

    ``{'class': 'org.apache.cassandra.locator.NetworkTopologyStrategy', 'r1': '1'}`` gives
    ``("NetworkTopologyStrategy", {"r1": 1})``. For SimpleStrategy the map is
    ``{"replication_factor": n}``: replicas are placed without regard to datacenters.
    """
    strategy = str(options.get("class", "")).rsplit(".", 1)[-1]
    replicas = {}
    for key, value in options.items():
        if key == "class":
            continue
        try:
            replicas[key] = int(value)
        except (TypeError, ValueError):
            continue  # e.g. a non-numeric option of some future strategy
    return strategy, replicas


def check_replication(replication: Mapping[str, int], *,
                      serial_consistency: str = "SERIAL",
                      commit_consistency: str = "QUORUM",
                      strategy: str = NETWORK_TOPOLOGY,
                      regions: Iterable[str] | None = None,
                      nodes: Mapping[str, int] | None = None) -> ReplicationVerdict:
    """Say whether a SERIAL/QUORUM commit survives the loss of any one datacenter.

    Args:
        replication: datacenter -> replicas of the keyspace (NetworkTopologyStrategy).
        serial_consistency: the Paxos consistency of appends (SERIAL or LOCAL_SERIAL).
        commit_consistency: the commit (write) consistency of appends.
        strategy: the keyspace's replication strategy (short class name).
        regions: the datacenters the deployment declares (one per region); each must hold
            replicas, else that region's data lives only elsewhere and the declared
            topology is not the keyspace's.
        nodes: datacenter -> nodes the cluster has there, if known. A datacenter with fewer
            nodes than replicas holds only as many replicas as it has nodes (Cassandra
            still counts the configured ones for the quorum).

    Returns:
        The verdict; ``reasons`` is empty exactly when it survives.
    """
    serial = serial_consistency.upper()
    commit = commit_consistency.upper()
    configured = {dc: int(n) for dc, n in replication.items() if int(n) > 0}
    total = sum(configured.values())
    quorum = total // 2 + 1
    reasons: list[str] = []

    if strategy != NETWORK_TOPOLOGY:
        reasons.append(f"the keyspace uses {strategy or 'an unknown strategy'}, which does "
                       f"not place replicas by datacenter; use NetworkTopologyStrategy with "
                       f"replicas in every region")
    if serial == "LOCAL_SERIAL":
        reasons.append("serial consistency LOCAL_SERIAL acknowledges a commit on a quorum of "
                       "the local datacenter only (the local durability mode, RPO > 0)")
    elif serial != "SERIAL":
        reasons.append(f"serial consistency {serial} is not SERIAL")
    if commit in ("EACH_QUORUM", "ALL"):
        reasons.append(f"commit consistency {commit} needs every datacenter, so commits stop "
                       f"while a region is down; use QUORUM")
    elif commit != "QUORUM":
        reasons.append(f"commit consistency {commit} does not make a commit visible to the "
                       f"QUORUM reads of a new owner in another region; use QUORUM")

    if total == 0:
        reasons.append("the keyspace has no replicas in any datacenter")
        return ReplicationVerdict(dict(replication), total, quorum, False, tuple(reasons))

    declared = list(regions or ())
    for dc in declared:
        if dc not in configured:
            reasons.append(f"region datacenter {dc} holds no replica of the keyspace")

    placed = dict(configured)
    if nodes is not None:
        for dc, n in configured.items():
            have = int(nodes.get(dc, 0))
            if have < n:
                placed[dc] = have
                reasons.append(f"datacenter {dc} has {have} node(s) for {n} replicas, so only "
                               f"{have} replica(s) exist there")
        if sum(placed.values()) < quorum:
            reasons.append(f"only {sum(placed.values())} of the {total} configured replicas "
                           f"exist, fewer than the quorum of {quorum}: no commit can succeed")

    if len(configured) < 2:
        only = next(iter(configured))
        reasons.append(f"all {total} replica(s) are in datacenter {only}: losing that region "
                       f"loses every acknowledged commit not copied elsewhere, and stops "
                       f"the ledger")
    else:
        for dc in sorted(configured):
            if placed[dc] >= quorum:
                reasons.append(f"datacenter {dc} holds {placed[dc]} of {total} replicas, a "
                               f"quorum ({quorum}) by itself: a commit can be acknowledged "
                               f"with copies in {dc} only, and losing {dc} loses it")
            left = sum(placed.values()) - placed[dc]
            if left < quorum:
                reasons.append(f"losing datacenter {dc} leaves {left} of {total} replicas, "
                               f"fewer than the quorum of {quorum}: commits stop")
    return ReplicationVerdict(dict(replication), total, quorum, not reasons, tuple(reasons))


def default_replication(local_dc: str, regions: Iterable[str] | None) -> dict[str, int]:
    """The replication ``connect`` creates when none is given: one replica per region."""
    dcs = list(dict.fromkeys(regions or ())) or [local_dc]
    return {dc: 1 for dc in dcs}


__all__ = ["ReplicationVerdict", "UnsafeReplication", "check_replication",
           "default_replication", "format_replication", "parse_replication"]
