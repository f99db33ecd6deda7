"""The ownership port: who owns which shard, with which epoch (fencing token).

At most one node owns a shard at a time, as far as the elector can tell. A lease or lock is
not mutual exclusion by itself (a paused owner may wake after its lease expired), so every
journal append also carries the epoch and the store refuses stale ones (``Fenced``). Epochs of
a shard only ever increase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol


@dataclass(slots=True, frozen=True)
class OwnerInfo:
    shard: int
    node_id: str
    region: str
    address: str  # host:port of the node's gRPC server ("" for in-process)
    epoch: int


@dataclass(slots=True, frozen=True)
class ShardPlacement:
    """The shard map's entry: the region a shard lives in when all is well."""

    shard: int
    home_region: str


# Changes of one shard's home the shard map keeps: an owner records every change it finds
# there that its chain lacks, so a shard moved several times before its next owner journaled
# anything loses none of them from its audit trail (up to this many).
HOME_CHANGES_KEPT = 8


@dataclass(slots=True, frozen=True)
class HomeChange:
    """Who changed a shard's home, how and why: written with the shard map entry
    (``EtcdOwnership.set_homes``, which keeps the latest ``HOME_CHANGES_KEPT``), and recorded
    in the shard's audit chain by the owner that next takes the shard over (``ledger.node``),
    so that an operator's move or failover is audited where the money is.

    Attributes:
        change_id: Unique per change (one id for every shard of one command).
        principal: Who: an operator's certificate identity (``ledgerctl``), or the node that
            took shards over from a dead region (``AutoFailover``).
        action: ``MoveShard``, ``Failover``, ``Failback``, ``RestoreHomes``, ``AutoFailover``.
        from_region: The shard's home before the change ("" if unknown).
        to_region: Its home after.
        at_ms: When it was made (wall clock of the one who made it).
        reason: The reason given, if any (free text from an operator: no personal data).
    """

    change_id: str
    principal: str
    action: str
    from_region: str
    to_region: str
    at_ms: int
    reason: str = ""

    def as_doc(self) -> dict:
        return {"id": self.change_id, "by": self.principal, "action": self.action,
                "from": self.from_region, "to": self.to_region, "at_ms": self.at_ms,
                **({"reason": self.reason} if self.reason else {})}

    @classmethod
    def from_doc(cls, doc: dict) -> "HomeChange":
        return cls(str(doc["id"]), str(doc.get("by", "")), str(doc.get("action", "")),
                   str(doc.get("from", "")), str(doc.get("to", "")), int(doc.get("at_ms", 0)),
                   str(doc.get("reason", "")))


# Called when this node gains (epoch > 0) or loses (epoch == 0) a shard.
OwnershipListener = Callable[[int, int], Awaitable[None]]


class Ownership(Protocol):
    """Elects shard owners and publishes the shard map and owners to every node.

    Adapters: ``shard_router.local.LocalOwnership`` (the embedded default: one node owns every
    shard) and ``shard_router.etcd.EtcdOwnership`` (etcd leases and compare-and-swap). Both
    pass ``tests/contract/test_ownership_contract.py``.

    Ordering, for every adapter:

    * Listener calls for one shard are made one at a time, in the order the changes happened;
      a call for a shard starts only after the previous call for that shard returned. Calls
      for different shards may interleave.
    * Every gain of a shard carries an epoch higher than any earlier gain of that shard, by
      any node (epochs are fencing tokens: the store refuses lower ones).
    * A gain may follow a gain of the same shard without a loss between them (a re-grant with
      a higher epoch): the newer epoch replaces the older one.
    * A loss (epoch 0) is reported at most once per gain, and only for a shard that was
      gained.
    """

    node_id: str
    region: str

    async def start(self, listener: OwnershipListener) -> None:
        """Join: register this node, start campaigning for the shards it should own, and
        call ``listener`` on every gain or loss of a shard by this node. Losses are reported
        before the lease can expire at the elector (a local deadline), so a node stops
        serving before anyone else may start.

        Gains won while starting may be reported before or after this returns (the etcd
        adapter returns after its first round of campaigns, with their gains scheduled).

        Raises:
            RuntimeError: ``start`` was called before on this object.
            Adapter errors (``EtcdOwnershipError``): the elector could not be reached; nothing
                is owned and the object is closed.
        """
        ...

    async def close(self) -> None:
        """Give up every shard (listener called with epoch 0) and leave.

        Returns once every loss has been reported (bounded by the adapter's timeout) and the
        elector has been told, so that other nodes may take the shards over at once. Calling
        it again does nothing. Never raises for an unreachable elector: the shards are then
        freed when the lease expires.
        """
        ...

    async def release(self, shard: int) -> None:
        """Give ``shard`` up after its owner stopped (a failure) or for a planned move.

        The shard is then granted again with a higher epoch: to another node if one should
        own it, else to this node after a pause (the local adapter: a pause that doubles per
        release; the etcd adapter: a hold of a few grace periods), so that a new owner fences
        the journal, replays it and serves. If this node still serves the shard, its loss is
        reported first (the local adapter's owners are already stopped when it is called, so
        it reports the new gain only). Does nothing for a shard this node does not own, or
        after ``close``.

        Raises:
            ValueError: ``shard`` is out of range.
            Adapter errors (etcd's client errors): the loss was reported, but the owner key
                could not be deleted; the adapter's own loop deletes it later (a stale key),
                so the caller only logs it.
        """
        ...

    def lease_valid(self) -> bool:
        """True while this node may still answer as owner of the shards it was granted.

        Owners call it after each journal append and before answering: a node paused past
        its lease (SIGSTOP, a long GC) must not answer as owner after it resumes, even before
        the loss is reported. No round trip: the etcd adapter compares a local deadline
        (counted from each keep-alive's send time, less a margin); it is False before
        ``start``, once keep-alives are late, and after ``close``. The local adapter has no
        lease and nothing can depose it: always True.

        An adapter whose lease can lapse and come back (etcd: a node past its deadline
        suspends its shards instead of losing them, and serves them again once etcd confirms
        the lease) also offers ``lease_valid_for(seconds)`` and ``wait_lease_valid(for_s)``:
        owners start no journal append that could end past the lease, and wait instead.
        """
        ...

    def owner(self, shard: int) -> OwnerInfo | None:
        """The current owner as last seen (a cache kept fresh by watches; no round trip).

        None if the shard has no owner now, or (local adapter) is out of range or the
        ownership is closed.

        An adapter whose cache changes under other nodes' moves may also offer
        ``on_owner_change(callback)``: called on the event loop whenever an owner appears or
        goes, so the router's retries wake at once (``EtcdOwnership`` does).
        """
        ...

    def placements(self) -> list[ShardPlacement]:
        """Every shard's home region as last seen, in shard order (no round trip)."""
        ...

    def home_changes(self, shard: int) -> list[HomeChange]:
        """The latest changes of ``shard``'s home as last seen (no round trip), oldest
        first; empty if its home never changed (the local adapter: never)."""
        ...
