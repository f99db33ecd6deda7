"""Issue 7, defect 4: a committed credit always lands.

Headroom on the receiving wallet was protected only by in-memory reservations, lost on
failover and dropped after 30 s: two credits could then be committed for more than the
wallet can take, and the second hit an invariant on every redelivery (the shard abdicated
again and again, the transfer stayed in doubt). Now a reservation is journaled on the credit
shard and dropped only when its credit landed or its debit shard says none will come; a
debit shard that never decided the transfer fences it, so a late Post under it is refused.
"""

from __future__ import annotations

import asyncio

import pytest

from coordinator import TransferItem
from ledger.core import constants as C
from ledger.core.model import (ApplyCredits, CreateWallet, Post, ReserveCredit, ResolveReservations,
                               settlement_wallet_id)
from ledger.core.shard import ShardState
from ledger.core.step import step as core_step
from ledger.core.status import Status
from tests.owner.conftest import ledger_of
from tests.owner.test_idempotency_claims import SHARDS, wallet_on


@pytest.fixture
async def ledger():
    led = await ledger_of(SHARDS)
    try:
        yield led
    finally:
        await led.close()


async def test_reserved_headroom_survives_failover_and_no_credit_overflows(ledger):
    c = ledger.coordinator
    a, b, rich = wallet_on(0, "a"), wallet_on(2, "b"), wallet_on(1, "rich")
    for w in (a, b):
        assert (await c.create_wallet("svc", "w-" + w, w, "CNY")).ok
        assert (await c.deposit("svc", "d-" + w, w, 1_000, "CNY")).ok
    assert (await c.create_wallet("svc", "w-rich", rich, "CNY")).ok
    assert (await c.deposit("svc", "d-rich", rich, C.AMOUNT_MINOR_MAX - 100, "CNY")).ok
    # a -> rich commits; its credit is held at the door of shard 1.
    door = ledger.peers.hold(1, ApplyCredits)
    first = asyncio.ensure_future(c.transfer("svc", TransferItem("x1", a, rich, 100, "CNY")))
    await door.entered.wait()
    # Shard 1 fails over while the credit is on its way: the new owner replays the journal.
    await ledger.peers.owners[1].stop("ownership lost")
    await ledger.start(1, epoch=2)
    # The headroom is still taken: another credit to the full wallet is refused up front.
    second = await c.transfer("svc", TransferItem("x2", b, rich, 50, "CNY"))
    assert second.status is Status.BALANCE_OVERFLOW and second.field == "amount_minor", second
    door.release.set()
    answer = await first
    assert answer.ok, answer
    owner = ledger.peers.owners[1]
    assert owner.state.wallets[rich].balance_minor == C.AMOUNT_MINOR_MAX
    assert owner.serving and not [s for s in ledger.stopped if "invariant" in s[1]]
    assert not owner.state.reservations  # the credit landed and took its reservation along
    owner.state.check()


def post(key: str, reserved_at: int, src: str = "a") -> Post:
    return Post("svc", key, "t0001" + key, "TRANSFER", src, "c", 10, "CNY", "", 2, 5_000,
                reserved_at_ms=reserved_at)


def funded_debit() -> ShardState:
    s = ShardState(1)
    dep = Post("svc", "d", "t0001dep", "DEPOSIT", settlement_wallet_id("CNY", 1), "a", 100,
               "CNY", "", 1, 1)
    core_step(s, [CreateWallet("svc", "w-a", "a", "CNY", False, 1), dep])
    return s


def step(state: ShardState, command):
    return core_step(state, [command]).outcomes[0]


def test_debit_shard_fences_an_undecided_reservation_and_refuses_its_late_post():
    debit = funded_debit()
    assert step(debit, ResolveReservations((("t0001k1", 7),), 40_000)).value == (False,)
    late = step(debit, post("k1", 7))
    assert late.status is Status.REQUEST_IN_FLIGHT and late.status.transient(), late
    assert debit.wallets["a"].balance_minor == 100
    retry = step(debit, post("k1", 9))  # the client's retry reserved anew
    assert retry.ok
    assert debit.outbox[2][1].reserved_at_ms == 9


def test_debit_shard_keeps_reservations_whose_credit_is_owed_and_drops_the_rest():
    debit = funded_debit()
    assert step(debit, post("k1", 7)).ok
    refused = step(debit, Post("svc", "k2", "t0001k2", "TRANSFER", "a", "c", 10_000, "CNY", "",
                               2, 5_000, reserved_at_ms=8))
    assert refused.status is Status.INSUFFICIENT_FUNDS
    answer = step(debit, ResolveReservations((("t0001k1", 7), ("t0001k1", 6),
                                              ("t0001k2", 8)), 40_000))
    assert answer.value == (True, False, False)


def test_credit_shard_answers_its_reservation_and_refuses_one_past_the_headroom():
    credit = ShardState(2)
    step(credit, CreateWallet("svc", "w-c", "c", "CNY", False, 1))
    assert step(credit, ReserveCredit("t0001k1", "c", "CNY", C.AMOUNT_MINOR_MAX, 5)).value == 5
    assert step(credit, ReserveCredit("t0001k1", "c", "CNY", C.AMOUNT_MINOR_MAX, 6)).value == 5
    over = step(credit, ReserveCredit("t0001k2", "c", "CNY", 1, 6))
    assert over.status is Status.BALANCE_OVERFLOW
    reused = step(credit, ReserveCredit("t0001k1", "c", "CNY", 3, 6))
    assert reused.status is Status.IDEMPOTENCY_KEY_REUSED and reused.field == "amount_minor"


async def test_stale_reservation_is_resolved_by_its_owner_sweep(ledger):
    c = ledger.coordinator
    a, rich = wallet_on(0, "a"), wallet_on(1, "rich")
    assert (await c.create_wallet("svc", "w-a", a, "CNY")).ok
    assert (await c.create_wallet("svc", "w-r", rich, "CNY")).ok
    # A coordinator reserved and died before posting.
    tid = "t0000" + "ab" * 12
    reserved = await ledger.peers.owners[1].submit(ReserveCredit(tid, rich, "CNY", 5, ledger.now))
    assert reserved.ok and ledger.peers.owners[1].state.incoming == {rich: 5}
    ledger.now += C.RESERVATION_TTL_MS + 1
    await ledger.peers.owners[1]._resolve_reservations(ledger.now)
    assert not ledger.peers.owners[1].state.reservations
    assert tid in ledger.peers.owners[0].state.fenced
