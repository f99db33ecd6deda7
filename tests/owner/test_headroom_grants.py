"""Grabs owed under headroom grants, across real shard owners (in-memory store, in-process
peers that read receivers' durable state like ``Router.wallet_currency``): no reservation
per grab, each receiver credited once, a receiver shard that cannot grant falls back to
reservations, and a wallet whose creation is not durable yet is never vouched for."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.envelopes import GrabItem
from ledger.core import constants as C
from ledger.core.model import CreateWallet, GrantHeadroom, ReserveCredit
from ledger.core.status import Status
from shard_router.hashing import shard_of
from tests.owner.conftest import Ledger, Peers
from tests.owner.test_envelopes import check_all, envelope_ledger, owed, until
from tests.owner.test_idempotency_claims import SHARDS, wallet_on


class LocalPeers(Peers):
    """Peers whose owners all run in this process, as the embedded default's router."""

    def wallet_currency(self, shard: int, wallet_id: str):
        return self.owners[shard].wallet_currency(wallet_id)


@pytest.fixture
async def ledger():
    led = await envelope_ledger(LocalPeers())
    try:
        yield led
    finally:
        await led.close()


def sent(led: Ledger, kind: type) -> list:
    return [c for _, commands in led.peers.calls for c in commands if type(c) is kind]


async def envelope(led: Ledger, shares: int, receivers: int) -> tuple[str, list[str]]:
    c = led.coordinator
    sender = wallet_on(0, "sender")
    assert (await c.create_wallet("svc", "w-" + sender, sender, "CNY")).ok
    assert (await c.deposit("svc", "d-" + sender, sender, 10_000, "CNY")).ok
    people = []
    for i in range(receivers):
        r = wallet_on(1 + i % (SHARDS - 1), f"r{i}-")
        assert (await c.create_wallet("svc", "w-" + r, r, "CNY")).ok
        people.append(r)
    made = await led.envelopes.create("svc", "env", sender, 1_000, shares, "FIXED", "CNY",
                                      60_000)
    assert made.ok, made
    eid = made.value[0].envelope_id
    await until(lambda: led.envelopes is not None and all(
        not o.state.outbox for o in led.peers.owners.values()), "the funding credit")
    return eid, people


async def test_grabs_owe_under_grants_without_a_reservation_each(ledger):
    eid, people = await envelope(ledger, shares=12, receivers=12)
    home = ledger.envelopes.shard_of_envelope(eid)
    ledger.peers.calls.clear()
    out = await ledger.envelopes.grab_many("svc", [GrabItem(f"g{i}", eid, r)
                                                   for i, r in enumerate(people[:6])])
    assert [o.status for o in out] == [Status.OK] * 6
    assert sent(ledger, ReserveCredit) == []
    # One grant per receiver shard other than the envelope's, asked for once.
    others = {shard_of(r, SHARDS) for r in people[:6]} - {home}
    assert sent(ledger, GrantHeadroom) == [GrantHeadroom(home, C.HEADROOM_GRANT_MINOR)] * len(
        others)
    # The next grabs of the envelope to the same shards ask for nothing more.
    ledger.peers.calls.clear()
    out = await ledger.envelopes.grab_many("svc", [GrabItem(f"g{i}", eid, r)
                                                   for i, r in enumerate(people[6:], 6)])
    assert [o.status for o in out] == [Status.OK] * 6
    assert not sent(ledger, GrantHeadroom) and not sent(ledger, ReserveCredit)
    await until(lambda: owed(ledger) == 0, "every credit")
    balances = ledger.balances()
    assert [balances[r] for r in people] == [1_000 // 12 + (1 if i < 1_000 % 12 else 0)
                                             for i in range(12)]
    check_all(ledger)


async def test_a_shard_that_cannot_grant_gets_reservations_and_keeps_call_order(ledger):
    eid, people = await envelope(ledger, shares=3, receivers=4)
    full_shard = shard_of(people[1], SHARDS)
    rich = wallet_on(full_shard, "rich")
    await ledger.wallet(full_shard, rich, balance=C.AMOUNT_MINOR_MAX - 10, allow_negative=False)
    ledger.peers.calls.clear()
    out = await ledger.envelopes.grab_many("svc", [GrabItem(f"g{i}", eid, r)
                                                   for i, r in enumerate(people)])
    assert [o.status for o in out] == [Status.OK, Status.OK, Status.OK,
                                       Status.ENVELOPE_SOLD_OUT]
    assert [c.wallet_id for c in sent(ledger, ReserveCredit)] == [
        r for r in people[:4] if shard_of(r, SHARDS) == full_shard]
    assert ledger.peers.owners[full_shard].state.grants_out == {}
    await until(lambda: owed(ledger) == 0, "every credit")
    check_all(ledger)


async def test_a_wallet_created_in_the_batch_being_appended_is_not_vouched_for(ledger):
    shard = 2
    owner = ledger.peers.owners[shard]
    gate = ledger.store.gate(shard, owner.state.seq + 1)
    w = wallet_on(shard, "fresh")
    created = asyncio.ensure_future(owner.submit(CreateWallet("svc", "w-" + w, w, "CNY", False,
                                                              ledger.now)))
    await gate.entered.wait()
    assert w in owner.state.wallets  # the live state runs ahead of the journal...
    assert owner.wallet_currency(w) is None  # ...but only durable facts are told
    gate.release.set()
    assert (await created).ok
    assert owner.wallet_currency(w) == "CNY"
    assert owner.wallet_currency(wallet_on(shard, "nobody")) is False
