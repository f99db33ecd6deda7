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

    def valid(self) -> bool:
        return self.left_s > 0

    def valid_for(self, seconds: float) -> bool:
        return self.left_s > seconds

    async def wait(self, for_s: float) -> None:
        self.waits += 1
        while not self.valid_for(for_s):
            self.confirmed.clear()
            await self.confirmed.wait()

    def confirm(self) -> None:
        self.left_s = 10.0
        self.confirmed.set()


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
