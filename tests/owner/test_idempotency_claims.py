"""Issue 7, defect 2: an idempotency key guards one request, whichever shard decides it.

A key is claimed on its own shard when the request is decided elsewhere. The claim used to be
skipped when the key's shard was the deciding shard, and the deciding shard looked only at
its own records, not at claims: key K used for a->c (a elsewhere), then for b->c (b on K's
shard) executed both. Wallet creations, holds and releases never claimed their key at all.
"""

from __future__ import annotations

import itertools

import pytest

from coordinator import TransferItem
from coordinator.coordinator import key_shard_of
from ledger.core.status import Status
from shard_router.hashing import shard_of
from tests.owner.conftest import Ledger, ledger_of

SHARDS = 4


def wallet_on(shard: int, prefix: str, shards: int = SHARDS) -> str:
    return next(f"{prefix}{i}" for i in itertools.count() if shard_of(f"{prefix}{i}", shards)
                == shard)


def key_on(shard: int, prefix: str = "k") -> str:
    return next(f"{prefix}{i}" for i in itertools.count()
                if key_shard_of("svc", f"{prefix}{i}", SHARDS) == shard)


@pytest.fixture
async def ledger():
    led = await ledger_of(SHARDS)
    try:
        yield led
    finally:
        await led.close()


async def funded(led: Ledger, wallet_id: str, amount: int = 1_000) -> None:
    c = led.coordinator
    assert (await c.create_wallet("svc", "w-" + wallet_id, wallet_id, "CNY")).ok
    if amount:
        assert (await c.deposit("svc", "d-" + wallet_id, wallet_id, amount, "CNY")).ok


async def test_key_used_elsewhere_then_on_its_own_shard_executes_once(ledger):
    key = key_on(0)
    a, b, c = wallet_on(1, "a"), wallet_on(0, "b"), wallet_on(2, "c")
    for w in (a, b, c):
        await funded(ledger, w)
    first = await ledger.coordinator.transfer("svc", TransferItem(key, a, c, 100, "CNY"))
    assert first.ok, first
    again = await ledger.coordinator.transfer("svc", TransferItem(key, b, c, 100, "CNY"))
    assert again.status is Status.IDEMPOTENCY_KEY_REUSED, again
    assert again.field == "from_wallet_id"
    assert ledger.peers.owners[0].state.wallets[b].balance_minor == 1_000


async def test_key_of_a_wallet_creation_guards_wallets_on_other_shards(ledger):
    key = key_on(0, "wk")
    first, second = wallet_on(1, "x"), wallet_on(2, "y")
    assert (await ledger.coordinator.create_wallet("svc", key, first, "CNY")).ok
    again = await ledger.coordinator.create_wallet("svc", key, second, "CNY")
    assert again.status is Status.IDEMPOTENCY_KEY_REUSED and again.field == "wallet_id", again
    assert second not in ledger.peers.owners[2].state.wallets
    replay = await ledger.coordinator.create_wallet("svc", key, first, "CNY")
    assert replay.ok and replay.replayed


async def test_key_of_a_hold_guards_holds_on_other_shards(ledger):
    key = key_on(0, "hk")
    a, b = wallet_on(1, "a"), wallet_on(2, "b")
    await funded(ledger, a)
    await funded(ledger, b)
    held = await ledger.coordinator.create_hold("svc", key, a, 100, "CNY", 60_000)
    assert held.ok, held
    again = await ledger.coordinator.create_hold("svc", key, b, 100, "CNY", 60_000)
    assert again.status is Status.IDEMPOTENCY_KEY_REUSED and again.field == "wallet_id", again
    assert ledger.peers.owners[2].state.wallets[b].held_minor == 0


async def test_key_of_a_release_guards_releases_of_other_holds(ledger):
    a, b = wallet_on(1, "a"), wallet_on(2, "b")
    await funded(ledger, a)
    await funded(ledger, b)
    h1 = (await ledger.coordinator.create_hold("svc", "h1", a, 100, "CNY", 60_000)).value
    h2 = (await ledger.coordinator.create_hold("svc", "h2", b, 100, "CNY", 60_000)).value
    key = key_on(0, "rk")
    assert (await ledger.coordinator.release_hold("svc", key, h1.hold_id)).ok
    again = await ledger.coordinator.release_hold("svc", key, h2.hold_id)
    assert again.status is Status.IDEMPOTENCY_KEY_REUSED and again.field == "hold_id", again
    assert ledger.peers.owners[2].state.holds[h2.hold_id].state == "HELD"


async def test_capture_all_and_capture_of_the_same_amount_are_one_request(ledger):
    a, c = wallet_on(1, "a"), wallet_on(2, "c")
    await funded(ledger, a)
    await funded(ledger, c, 0)
    hold = (await ledger.coordinator.create_hold("svc", "h", a, 300, "CNY", 60_000)).value
    key = key_on(3, "ck")  # claimed on shard 3, decided on the hold's shard 1
    first = await ledger.coordinator.capture_hold("svc", key, hold.hold_id, 0, c)
    assert first.ok and first.value.amount_minor == 300, first
    named = await ledger.coordinator.capture_hold("svc", key, hold.hold_id, 300, c)
    assert named.ok and named.replayed, named
    other = await ledger.coordinator.capture_hold("svc", key, hold.hold_id, 200, c)
    assert other.status is Status.IDEMPOTENCY_KEY_REUSED and other.field == "amount_minor"
