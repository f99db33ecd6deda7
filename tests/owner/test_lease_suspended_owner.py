"""An owner whose node's lease has too little left (keep-alives late: the node is suspended,
``shard_router.etcd``, "Suspend, not give up") starts no append and answers nothing; once the
lease is confirmed it answers what was queued from one append, and goes on serving.

Why: before, a batch formed while keep-alives were late was appended, then found the lease
invalid once the write returned, and the owner gave the shard up (a takeover, here or
elsewhere, for a shard nobody else could have won: etcd was merely away).
"""

from __future__ import annotations

import asyncio

from ledger import constants as K
from ledger import metrics
from ledger.core.model import CreateWallet
from ledger.owner import ShardOwner
from tests.owner.conftest import Peers
from tests.owner.memstore import MemStore, settle

NO_HANG_S = 5.0


class Lease:
    """The node's lease as an owner sees it: valid for N more seconds, and a wait for it."""

    def __init__(self) -> None:
        self.left_s = 10.0
        self.confirmed = asyncio.Event()
        self.waits = 0
        self.confirms = 0
        self.held = True

    def valid(self) -> bool:
        return self.left_s > 0

    def valid_for(self, seconds: float) -> bool:
        return self.left_s > seconds

    async def wait(self, for_s: float) -> None:
        self.waits += 1
        while not self.valid_for(for_s):
            self.confirmed.clear()
            await self.confirmed.wait()

    def confirm(self, held: bool = True) -> None:
        self.left_s = 10.0
        self.held = held
        self.confirmed.set()

    async def confirm_held(self, shard: int, epoch: int) -> bool:
        """As ``EtcdOwnership.confirm_held``: once etcd answered, is the shard still ours?"""
        self.confirms += 1
        while not self.valid():
            self.confirmed.clear()
            await self.confirmed.wait()
        return self.held


def _lease_waits() -> float:
    return metrics.REGISTRY.get_sample_value("ledger_owner_lease_waits_total") or 0.0


async def test_a_suspended_owner_holds_its_queue_until_the_lease_is_confirmed():
    store, lease, stopped = MemStore(), Lease(), []

    async def on_stopped(shard, epoch, reason):
        stopped.append(reason)

    owner = ShardOwner(0, 1, store, Peers(), clock_ms=lambda: 1_000, on_stopped=on_stopped,
                       lease_valid=lease.valid, lease_valid_for=lease.valid_for,
                       wait_lease=lease.wait)
    await owner.start()
    try:
        made = await owner.submit(CreateWallet("t", "k0", "w0", "CNY", False, 1))
        assert made.ok, made
        appends = store.appends
        waits = _lease_waits()
        # Less than the headroom left (the deadline is near, or past): nothing is started.
        lease.left_s = K.APPEND_LEASE_HEADROOM_S / 2
        calls = [asyncio.ensure_future(owner.submit(CreateWallet("t", f"k{i}", f"w{i}", "CNY",
                                                                 False, 1)))
                 for i in (1, 2)]
        await settle()
        assert lease.waits >= 1
        assert _lease_waits() > waits  # /metrics shows the hold
        assert store.appends == appends
        assert not any(c.done() for c in calls)
        assert owner.serving and stopped == []
        lease.confirm()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls), NO_HANG_S)
        assert all(o.ok for o in outcomes), outcomes
        assert store.appends == appends + 1  # both from one batch
        assert owner.serving and stopped == []
        assert set(owner.state.wallets) >= {"w0", "w1", "w2"}
    finally:
        await owner.stop()


async def _owner(store, lease, stopped) -> ShardOwner:
    async def on_stopped(shard, epoch, reason):
        stopped.append(reason)

    owner = ShardOwner(0, 1, store, Peers(), clock_ms=lambda: 1_000, on_stopped=on_stopped,
                       lease_valid=lease.valid, lease_valid_for=lease.valid_for,
                       wait_lease=lease.wait, confirm_held=lease.confirm_held)
    await owner.start()
    made = await owner.submit(CreateWallet("t", "k0", "w0", "CNY", False, 1))
    assert made.ok, made
    return owner


async def _append_past_the_deadline(store, owner, lease) -> asyncio.Future:
    """A call whose append is out when the lease's deadline passes; it returns after."""
    gate = store.gate(0, owner.state.seq + 1)
    call = asyncio.ensure_future(owner.submit(CreateWallet("t", "k1", "w1", "CNY", False, 1)))
    await asyncio.wait_for(gate.entered.wait(), NO_HANG_S)
    lease.left_s = 0.0  # the deadline passes while the write is out
    gate.release.set()
    await settle()
    return call


async def test_an_append_that_ends_past_the_deadline_waits_for_etcd_and_counts_if_held():
    """Keep-alives late while an append is in flight (a loaded machine, an etcd election):
    the write returns after the deadline. The owner neither answers nor gives the shard up;
    once etcd confirms the shard is still this node's with this epoch, the batch is
    acknowledged. Before, the shard was given up (a takeover of every shard in flight: 9 on
    one node in a kill-region run at load, after a 0.11 s suspension)."""
    store, lease, stopped = MemStore(), Lease(), []
    owner = await _owner(store, lease, stopped)
    try:
        call = await _append_past_the_deadline(store, owner, lease)
        assert lease.confirms == 1 and not call.done()
        assert owner.serving and stopped == []
        lease.confirm(held=True)
        made = await asyncio.wait_for(call, NO_HANG_S)
        assert made.ok, made
        assert owner.serving and stopped == [] and "w1" in owner.state.wallets
    finally:
        await owner.stop()


async def test_an_append_that_ends_past_the_deadline_is_not_acknowledged_if_the_shard_went():
    store, lease, stopped = MemStore(), Lease(), []
    owner = await _owner(store, lease, stopped)
    try:
        call = await _append_past_the_deadline(store, owner, lease)
        lease.confirm(held=False)  # etcd answered: the key is gone (or the lease expired)
        made = await asyncio.wait_for(call, NO_HANG_S)
        assert not made.ok  # SHARD_UNAVAILABLE: retried on the next owner, never a guess
        assert not owner.serving and stopped == ["lease no longer valid"]
    finally:
        await owner.stop()
