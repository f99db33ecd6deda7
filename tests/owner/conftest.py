"""Real ``ShardOwner``s over an in-memory store and in-process peers (no servers)."""

from __future__ import annotations

import pytest

from coordinator import Coordinator
from ledger.core.model import CreateWallet, Post, settlement_wallet_id
from ledger.owner import ShardOwner
from ledger.store.sqlite import SqliteStore
from tests.owner.memstore import Gate, MemStore


@pytest.fixture
async def store(tmp_path):
    """The embedded default's real store, in a fresh file (tests that need SQLite itself)."""
    s = await SqliteStore.open(tmp_path / "ledger.db")
    try:
        yield s
    finally:
        await s.close()


class Peers:
    """The owners' ``ShardExecutor``: calls the owner object of a shard directly. A test can
    hold the next call to a shard at the door (``hold``)."""

    def __init__(self) -> None:
        self.owners: dict[int, ShardOwner] = {}
        self.held: dict[int, tuple[Gate, type | None]] = {}
        self.calls: list[tuple[int, list]] = []

    def hold(self, shard: int, command: type | None = None) -> Gate:
        """Hold the next call to ``shard`` (whose first command is a ``command``, if given)."""
        gate = Gate()
        self.held[shard] = (gate, command)
        return gate

    async def execute(self, shard: int, commands: list, wait_credit: bool = False,
                      deadline: float | None = None):
        self.calls.append((shard, list(commands)))
        gate, kind = self.held.get(shard, (None, None))
        if gate is not None and (kind is None or type(commands[0]) is kind):
            del self.held[shard]
            gate.entered.set()
            await gate.release.wait()
        return await self.owners[shard].submit_many(commands, wait_credit, deadline)


class Ledger:
    def __init__(self, shards: int = 2) -> None:
        self.store = MemStore()
        self.peers = Peers()
        self.shards = shards
        self.now = 1_000
        self.stopped: list[tuple[int, str]] = []

    async def start(self, shard: int, epoch: int = 1) -> ShardOwner:
        async def on_stopped(s, e, reason):
            self.stopped.append((s, reason))
        owner = ShardOwner(shard, epoch, self.store, self.peers, clock_ms=lambda: self.now,
                           on_stopped=on_stopped)
        await owner.start()
        self.peers.owners[shard] = owner
        return owner

    async def wallet(self, shard: int, wallet_id: str, balance: int = 0,
                     allow_negative: bool = False) -> None:
        owner = self.peers.owners[shard]
        created = await owner.submit(CreateWallet("t", "w-" + wallet_id, wallet_id, "CNY",
                                                  allow_negative, self.now))
        assert created.ok, created
        if balance:
            dep = await owner.submit(Post("t", "d-" + wallet_id, "dep-" + wallet_id, "DEPOSIT",
                                          settlement_wallet_id("CNY", shard), wallet_id,
                                          balance, "CNY", "", shard, self.now))
            assert dep.ok, dep

    def balances(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for owner in self.peers.owners.values():
            for w in owner.state.wallets.values():
                out[w.wallet_id] = w.balance_minor
        return out

    def in_transit(self) -> int:
        return sum(c.amount_minor for owner in self.peers.owners.values()
                   for items in owner.state.outbox.values() for c in items.values()
                   if c.outbox_seq > self.peers.owners[c_dest(owner, c)].state.inbox_applied.get(
                       owner.shard, 0))

    async def close(self) -> None:
        for owner in list(self.peers.owners.values()):
            await owner.stop("test over")


def c_dest(owner: ShardOwner, credit) -> int:
    for dest, items in owner.state.outbox.items():
        if items.get(credit.outbox_seq) is credit:
            return dest
    raise KeyError(credit)


@pytest.fixture
async def ledger():
    led = Ledger()
    try:
        yield led
    finally:
        await led.close()


async def ledger_of(shards: int) -> Ledger:
    """An owner of every shard of a ``shards``-shard ledger, and a coordinator over them."""
    led = Ledger(shards)
    for shard in range(shards):
        await led.start(shard)
    led.coordinator = Coordinator(led.peers, led.store, shards, clock_ms=lambda: led.now)
    return led
